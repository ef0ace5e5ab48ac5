"""GPU speed-ups for the training step, switched on from the trainer config (src/cns_lightning/conf/trainer/gpu.yaml).

``SpeedUps`` is a Lightning callback: at ``setup`` it asks the ``ContinualModule`` for a channels-last
UNet and a ``torch.compile``d training forward (``ContinualModule.enable_speedups``; ``regional``:
only the UNet's repeated transformer blocks are compiled, as diffusers' ``compile_repeated_blocks``
does). Both are done once per module, so the per-stage Trainers of the continual loop reuse the
compiled graph. On a machine without CUDA it does nothing (CPU runs and tests stay eager and exact).

``use_compile_cache`` points Inductor's on-disk caches (FX graphs, AOTAutograd, Triton kernels)
into the project's cache folder (``paths.cache_dir``: ``$CNS_CACHE``, default
``~/.cache/cns_lightning``), under ``compile/``, so every job of a multirun and every rerun on the
machine reuses what the first one compiled (docs/benchmarks.md: what is cached, how to clear it).
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch


def use_compile_cache(cache_dir) -> Path:
    """Inductor's cache folder (``TORCHINDUCTOR_CACHE_DIR``; Triton's kernels go beneath it) set to
    ``<cache_dir>/compile`` unless the user's environment names another; returns the folder in use.
    (Inductor writes its default, ``/tmp/torchinductor_<user>``, into the environment the first time
    it is asked, often while torch is imported: that value counts as unset.)"""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        inductor_default = default_cache_dir()
    except ImportError:  # another torch layout: Inductor's documented default
        import getpass
        import tempfile

        inductor_default = os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current in (None, "", inductor_default):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir).expanduser().resolve() / "compile")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


class SpeedUps(L.Callback):
    def __init__(self, compile: bool | dict = True, channels_last: bool = True, cuda_only: bool = True, regional: bool = False):
        self.compile = compile
        self.channels_last = channels_last
        self.cuda_only = cuda_only
        self.regional = bool(regional)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.cuda_only and not (torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda"):
            return
        if not hasattr(pl_module, "enable_speedups"):
            raise TypeError(f"SpeedUps needs a module with enable_speedups(), got {type(pl_module).__name__}")
        pl_module.enable_speedups(compile=self.compile, channels_last=self.channels_last, regional=self.regional)
