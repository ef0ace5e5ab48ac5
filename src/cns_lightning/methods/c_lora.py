"""C-LoRA: Smith et al., "Continual Diffusion: Continual Customization of Text-to-Image Diffusion
with C-LoRA", TMLR 2023 (a baseline of Liao et al., ICCV 2025, Table 1).

Concept t trains a new low-rank adapter B_t A_t on every cross-attention K/V (``method.layers=kv``)
and its own custom token; the adapters of concepts 1..t-1 stay active and frozen (peft adapters of
their own beside the new one, on W_0: ``LoRAMethod.keeps_earlier_live``), so the model after task t
is W_0 + sum_{t'<=t} B_t' A_t' (between stages it lives in the weights: ``lora.merged_weight``).
The self-regularization penalty (:func:`self_regularization`) keeps the new adapter from writing
where the earlier ones did.

Knobs (``conf/method/c_lora.yaml``): ``rank``, ``lr_lora``, ``penalty_weight`` (lambda), ``layers``.
The paper's own rank and lambda could not be read; the defaults are T2I-ConBench's re-implementation
(K1nght/T2I-ConBench, Apache-2.0): rank 16, lambda 1e6, lr 5e-6.
"""

from __future__ import annotations

from typing import Callable

import torch

from .base import Knob, RunContext
from .lora import LoRAMethod, adapter_name, factors, rank_knob, LAYER_CHOICES


def self_regularization(past: dict[str, torch.Tensor], adapters: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """C-LoRA's self-regularization loss (Smith et al. 2023, Sec. 4): sum over layers of
    ‖ (sum_{t'<t} B_t' A_t') ⊙ (B_t A_t) ‖_F^2, the past sum detached (``past``: per layer, out x in;
    ``adapters``: the new adapter's (A, B) per layer). (Some re-implementations take |past|: the
    square makes it the same.)"""
    terms = [((past[n].detach() * (b.float() @ a.float())) ** 2).sum() for n, (a, b) in adapters.items() if n in past]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


class CLoRA(LoRAMethod):
    keeps_earlier_live = True
    knobs = (
        rank_knob("16"),
        Knob("lr_lora", "float", 0.0, resumable=True),
        Knob("penalty_weight", "float", 0.0, resumable=True, example="1e6"),
        Knob("layers", "choice", choices=LAYER_CHOICES),
    )

    def __init__(self, name: str = "c_lora", rank: int = 16, lr_lora: float = 5e-6, penalty_weight: float = 1e6, layers: str = "kv", **shared):
        super().__init__(name, rank=rank, lr_lora=lr_lora, layers=layers, **shared)
        self.penalty_weight = float(penalty_weight)

    def penalty(self, ctx: RunContext, m: int) -> Callable[[], torch.Tensor] | None:
        """lambda x :func:`self_regularization` of the new adapter against the sum of the earlier
        adapters 1..m-1 (the frozen peft adapters live beside it)."""
        if m == 0 or self.penalty_weight == 0.0:
            return None
        layers = self.live["unet"]
        with torch.no_grad():
            past = {n: sum(b.float() @ a.float() for a, b in (factors(layer, adapter_name(i)) for i in range(m))) for n, layer in layers.items()}
        adapters, weight = self.live_factors()["unet"], self.penalty_weight
        return lambda: weight * self_regularization(past, adapters)
