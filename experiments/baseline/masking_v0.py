# Baseline for experiments/bench_gpu.py only: src/cns_lightning/masking.py as of commit 82654f9,
# before the GPU speed work (issue 5). Not used by the package.
"""Masked updates: only the selected entries of a parameter may change during a stage.

Two mechanisms, both attached to a stage's parameters and removed afterwards:

* gradient masks (``Tensor.register_hook``): gradients outside the mask are zeroed, so the
  optimizer's moments only ever see the concept's entries;
* a masked-optimizer hook (``Optimizer.register_step_post_hook``): after every step, entries
  outside the mask are copied back from the stage-start reference. This makes the guarantee
  bit-exact whatever the optimizer does (weight decay, eps, mixed precision, fused kernels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MaskedParam:
    param: torch.nn.Parameter
    mask: torch.Tensor  # bool, broadcastable to param (a row mask for embeddings: shape (rows, 1))
    reference: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.reference = self.param.detach().clone()


class MaskedUpdates:
    """Attach gradient masks and a post-step restore to a set of (parameter, mask) pairs."""

    def __init__(self, pairs: list[MaskedParam]):
        self.pairs = pairs
        self._handles: list = []

    def attach_gradient_masks(self) -> None:
        for mp in self.pairs:
            mask = mp.mask

            def hook(grad: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
                return grad * mask.to(grad.dtype)

            self._handles.append(mp.param.register_hook(hook))

    def attach_to_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        def restore(opt, args, kwargs) -> None:  # noqa: ARG001 (hook signature)
            self.restore_outside_masks()

        self._handles.append(optimizer.register_step_post_hook(restore))

    @torch.no_grad()
    def restore_outside_masks(self) -> None:
        for mp in self.pairs:
            mp.param.data.copy_(torch.where(mp.mask, mp.param.data, mp.reference))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def row_mask(num_rows: int, rows: list[int], device=None) -> torch.Tensor:
    """A (num_rows, 1) bool mask selecting ``rows`` of an embedding matrix."""
    m = torch.zeros(num_rows, 1, dtype=torch.bool, device=device)
    m[rows] = True
    return m
