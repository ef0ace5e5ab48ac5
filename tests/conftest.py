"""Shared fixtures: tiny random pipelines, concept folders of generated images, the Hydra CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
CONF = ROOT / "src" / "cns_lightning" / "conf"  # the shipped configs (package data)


def make_concept_folder(folder: str | os.PathLike, n: int = 3, seed: int = 0, size: int = 48,
                        captions: list[str] | None = None) -> Path:
    """A concept folder of ``n`` distinct random RGB images (``size`` px, one base colour per
    ``seed`` plus noise) and, with ``captions``, their .txt captions: data for tests and checks
    (here and experiments/check_gpu.py), no download."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    for i in range(n):
        arr = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype("uint8")
        Image.fromarray(arr).save(folder / f"{i:02d}.png")
        if captions:
            (folder / f"{i:02d}.txt").write_text(captions[i % len(captions)])
    return folder


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


def compose_cfg(tmp_path: Path, overrides: list[str]):
    """The CLI's config (same files, same overrides; ``hydra.compose`` in-process) with the run
    folder and caches under tmp_path."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*overrides, f"paths.run_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"])


def unet_output(unet, seed: int = 0):
    """The UNet's noise prediction (fp32) on fixed random latents, timesteps and text states."""
    import torch

    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    h = torch.randn(2, 7, c.cross_attention_dim, generator=g)
    with torch.no_grad():
        out = unet(x.to(unet.device, unet.dtype), torch.tensor([10, 500], device=unet.device),
                   encoder_hidden_states=h.to(unet.device, unet.dtype)).sample
    return out.float().cpu()


def text_output(text_encoder, ids):
    """The text encoder's last hidden states (fp32) for token ids ``ids``."""
    import torch

    with torch.no_grad():
        return text_encoder(ids.to(text_encoder.device))[0].float().cpu()
