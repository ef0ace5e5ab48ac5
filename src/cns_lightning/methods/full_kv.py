"""Full K/V: Custom Diffusion (Kumari et al., "Multi-Concept Customization of Text-to-Image
Diffusion", CVPR 2023) trained sequentially, the weight-sharing baseline of Liao et al. (ICCV 2025).

Every cross-attention K/V entry and the concept's token train, with no L_reg, one concept after
the other into one model. The stage format is CNS's (``kv_store``), with masks that hold every entry.
"""

from __future__ import annotations

import torch

from ..concepts import Concept
from ..models import cross_attention_kv
from ..selection import mask_stats
from .base import Knob, RunContext
from .cns import CNS


class FullKV(CNS):
    knobs = (Knob("lr_neurons", "float", 0.0, resumable=True),)

    def __init__(self, name: str = "full_kv", lr_neurons: float = 1e-5, **shared):
        # L_reg's weights are 0: its (zero) term is still evaluated, as before this class existed.
        super().__init__(name, selection=None, lambda1=0.0, lambda2=0.0, lr_neurons=lr_neurons, **shared)

    def select(self, ctx: RunContext, m: int, concept: Concept) -> tuple[dict[str, torch.Tensor], dict]:
        masks = {n: torch.full(w.shape, True, dtype=torch.bool, device=w.device) for n, w in cross_attention_kv(ctx.pipe.unet).items()}
        return masks, dict(mask_stats(masks), rule="all")
