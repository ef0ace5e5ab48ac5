"""Shared fixtures: tiny random pipelines, concept folders of generated images, the Hydra CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cns_lightning.concepts import write_random_concept_folder

ROOT = Path(__file__).resolve().parents[1]

# A concept folder of n distinct random RGB images (and optional .txt captions).
make_concept_folder = write_random_concept_folder


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One torch thread for the whole session (CLI runs get OMP_NUM_THREADS=1 from ``env``): tiny
    models run far faster on one thread than on two contended ones (measured: 35 s -> 2.3 s CPU
    for a 3-stage evaluation on the 2-core CI machine; OpenMP threads spin-wait when cores are busy)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def concept_dirs(tmp_path) -> list[Path]:
    return [make_concept_folder(tmp_path / "data" / name, n=3, seed=k) for k, name in enumerate(["teddy", "mug", "vase"])]


@pytest.fixture
def env(tmp_path) -> dict:
    """Environment for CLI runs: outputs and caches under tmp_path."""
    e = dict(os.environ)
    e.update(CNS_CACHE=str(tmp_path / "cache"), CNS_OUTPUT=str(tmp_path / "out"), WANDB_MODE="offline", HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1")
    return e


def concepts_override(dirs: list[Path], classes=("teddy bear", "mug", "vase")) -> str:
    items = [f"{{name:{d.name},class_name:'{c}',path:'{d}'}}" for d, c in zip(dirs, classes)]
    return "data.concepts=[" + ",".join(items) + "]"


FAST = [
    "method.steps=4",
    "prior.num_images=2",
    "prior.num_inference_steps=2",
    "trainer.enable_progress_bar=false",
    "++eval.enabled=false",
]


def run_cli(args: list[str], env: dict, module: str = "cns_lightning", check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc
