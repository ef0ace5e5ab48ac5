"""GPU speed-ups for the training step, switched on from the trainer config (src/cns_lightning/conf/trainer/gpu.yaml).

``SpeedUps`` is a Lightning callback: at ``setup`` it asks the ``ContinualModule`` for a channels-last
UNet and a ``torch.compile``d training forward (``ContinualModule.enable_speedups``). Both are done once
per module, so the per-stage Trainers of the continual loop reuse the compiled graph. On a machine
without CUDA it does nothing (CPU runs and tests stay eager and exact).
"""

from __future__ import annotations

import lightning as L
import torch


class SpeedUps(L.Callback):
    def __init__(self, compile: bool | dict = True, channels_last: bool = True, cuda_only: bool = True):
        self.compile = compile
        self.channels_last = channels_last
        self.cuda_only = cuda_only

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.cuda_only and not (torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda"):
            return
        if not hasattr(pl_module, "enable_speedups"):
            raise TypeError(f"SpeedUps needs a module with enable_speedups(), got {type(pl_module).__name__}")
        pl_module.enable_speedups(compile=self.compile, channels_last=self.channels_last)
