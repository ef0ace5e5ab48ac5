"""Orthogonal Adaptation: Po et al., "Orthogonal Adaptation for Modular Customization of Diffusion
Models", CVPR 2024 (a baseline of Liao et al., ICCV 2025, Table 1).

Concept i's LoRA is ΔW_i = B_i A_i with A_i (r x in) a fixed slice of one random orthogonal basis
of the layer's input space (:func:`orthogonal_basis`, rows i*r .. (i+1)*r: disjoint slices, so
A_i A_j^T = 0 for i != j; copied into the peft adapter's ``lora_A``, frozen) and only B_i
(zero-initialised ``lora_B``) and the concept's token training. Merge:
W = W_0 + sum_i ΔW_i (``lora.merged_weight``; a sum, no optimisation). At most in / r concepts fit
in a layer of input width in: checked on the model before anything trains (``check_model``).

Knobs (``conf/method/orthogonal_adaptation.yaml``): ``rank``, ``lr_lora``, ``layers``. No official
code was found; the defaults follow the public re-implementation pilancilab/spectral_adapter
(rank 5 in its configs, UNet lr 3e-5, embedding lr 1e-3).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..concepts import Concept
from .base import ModelFitError, RunContext
from .lora import LoRAMethod, unet_targets


def orthogonal_basis(width: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal basis of R^width (rows orthonormal): the Q of the QR decomposition of a
    Gaussian matrix (Po et al. 2024, Sec. 3.3), sign-fixed so it is unique for the draw (float64 QR)."""
    g = torch.randn(width, width, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.t().contiguous().float()


def concept_slice(basis: torch.Tensor, i: int, rank: int) -> torch.Tensor:
    """A_i: rows i*rank .. (i+1)*rank of the layer's basis (disjoint for different concepts)."""
    return basis[i * rank : (i + 1) * rank].clone()


def concepts_that_fit(width: int, rank: int) -> int:
    return width // rank


class OrthogonalAdaptation(LoRAMethod):
    train_down = False

    def __init__(self, name: str = "orthogonal_adaptation", rank: int = 5, lr_lora: float = 3e-5, layers: str = "kv", **shared):
        super().__init__(name, rank=rank, lr_lora=lr_lora, layers=layers, **shared)

    def check_model(self, pipe, concepts: list[Concept]) -> None:
        """Every adapted layer's basis holds len(concepts) disjoint slices of ``rank`` rows."""
        n = len(concepts)
        for name, lin in unet_targets(pipe.unet, self.layers).items():
            fit = concepts_that_fit(lin.in_features, self.rank)
            if fit < n:
                raise ModelFitError(
                    f"method.rank={self.rank}: the orthogonal basis of {name} (input width {lin.in_features}) holds "
                    f"{fit} disjoint slices of rank {self.rank}, but the sequence has {n} concepts. "
                    f"Lower method.rank to {max(1, lin.in_features // n)} or less (e.g. method.rank={max(1, lin.in_features // n)}), "
                    f"or train at most {fit} concepts (data.concepts)."
                )

    def setup(self, ctx: RunContext) -> None:
        """One basis per adapted layer, drawn from the run's seed (the same for every concept)."""
        super().setup(ctx)
        gen = torch.Generator().manual_seed(int(ctx.seed))
        self.bases = {name: orthogonal_basis(lin.in_features, gen) for name, lin in self.targets(ctx)["unet"].items()}

    def down_init(self, ctx: RunContext, m: int) -> Callable[[str, nn.Linear], torch.Tensor]:
        def down(name: str, lin: nn.Linear) -> torch.Tensor:
            a = concept_slice(self.bases[name], m, self.rank)
            if a.shape[0] < self.rank:
                raise ModelFitError(f"method.rank={self.rank}: the basis of {name} has no slice left for concept {m + 1}; lower method.rank.")
            return a

        return down
