"""Checkpoints of the micro models' GPU trainings (pretraining, the identity model): resumable runs.

Separate from ``cns_lightning.checkpoint``, which reads run folders through safetensors and JSON
only. A training checkpoint holds tensors, numbers, strings, lists and dicts (model and optimizer
state, step, generator state); it is written atomically and read with ``weights_only=True``, so
loading one never unpickles arbitrary objects.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from ..checkpoint import atomic_write_bytes


def save_training_state(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_training_state(path: Path, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)
