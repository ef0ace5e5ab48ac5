"""The evaluator's persistent state, ``run_dir/eval/state.json``, written atomically.

A run that is interrupted and resumed continues the same matrices: the state holds everything the
evaluator measured so far (forgetting matrices, zero-shot scores per stage, the base model's
scores, the sample files, multi-concept results) and the settings it was measured with.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import atomic_write_bytes
from .forgetting import from_json, new_matrix, to_json

STATE_VERSION = 1
# clip_i / clip_t: mean over samples; *_best: the paper's best-of-N; dino*: only with a DINO model.
MATRIX_KEYS = ("clip_i", "clip_t", "clip_i_best", "clip_t_best", "dino", "dino_best")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically: ``checkpoint.atomic_write_bytes`` (temp file, fsync, rename, mode 0644)."""
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(obj), indent=1, allow_nan=False) + "\n")


def _clean(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


class StateError(ValueError):
    """``eval/state.json`` cannot be continued by this run; the message says why and what to do."""


@dataclass
class EvalState:
    concepts: list[str]
    clip_model: str
    settings: dict[str, Any] = field(default_factory=dict)
    matrices: dict[str, np.ndarray] = field(default_factory=dict)
    zero_shot: dict[str, list[float]] = field(default_factory=dict)  # "mean"/"best": length T+1 (stage 0..T)
    base: dict[str, Any] = field(default_factory=dict)  # stage-0 scores (class prompts, zero-shot)
    stages_done: list[int] = field(default_factory=list)
    samples: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # stage -> name -> files
    multi: dict[str, Any] = field(default_factory=dict)
    dino_model: str | None = None

    @classmethod
    def new(cls, concepts: list[str], clip_model: str, settings: dict, dino_model: str | None = None) -> "EvalState":
        T = len(concepts)
        st = cls(concepts=list(concepts), clip_model=clip_model, settings=dict(settings), dino_model=dino_model)
        keys = MATRIX_KEYS if dino_model else MATRIX_KEYS[:4]
        st.matrices = {k: new_matrix(T) for k in keys}
        st.zero_shot = {"mean": [math.nan] * (T + 1), "best": [math.nan] * (T + 1)}
        return st

    @property
    def n(self) -> int:
        return len(self.concepts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "concepts": self.concepts,
            "clip_model": self.clip_model,
            "dino_model": self.dino_model,
            "settings": self.settings,
            "stages_done": sorted(self.stages_done),
            "matrices": {k: to_json(v) for k, v in self.matrices.items()},
            "zero_shot": self.zero_shot,
            "base": self.base,
            "samples": self.samples,
            "multi": self.multi,
        }

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "state.json") -> "EvalState":
        try:
            st = cls(
                concepts=list(d["concepts"]),
                clip_model=str(d["clip_model"]),
                settings=dict(d.get("settings", {})),
                dino_model=d.get("dino_model"),
                stages_done=[int(s) for s in d.get("stages_done", [])],
                base=dict(d.get("base", {})),
                samples=dict(d.get("samples", {})),
                multi=dict(d.get("multi", {})),
            )
            st.matrices = {k: from_json(v) for k, v in d["matrices"].items()}
            st.zero_shot = {k: [math.nan if x is None else float(x) for x in v] for k, v in d.get("zero_shot", {}).items()}
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(
                f"{where}: not a valid evaluator state ({e.__class__.__name__}: {e}). Delete the file to start the "
                "evaluation afresh (the scores measured so far are lost)."
            ) from e
        for k, R in st.matrices.items():
            if R.shape != (st.n, st.n):
                raise StateError(f"{where}: matrix {k!r} has shape {R.shape}, expected {(st.n, st.n)}; delete the file")
        return st

    @classmethod
    def load(cls, path: Path) -> "EvalState":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise StateError(f"{path}: not valid JSON ({e}); delete the file to start the evaluation afresh") from e
        return cls.from_dict(d, where=str(path))
