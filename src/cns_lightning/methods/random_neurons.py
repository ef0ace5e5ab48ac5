"""Random neurons: the Table 2 ablation of Liao et al. (ICCV 2025).

Per layer the same number of K/V entries as CNS selects (Eq. 3-6), drawn uniformly at random
(seeded by the run's seed + the stage), trained with L_reg as CNS trains its concept neurons.
Everything but the selection is CNS's (``cns.py``), the stage format included.
"""

from __future__ import annotations

import torch

from ..concepts import Concept
from ..selection import mask_stats, random_like_counts
from .base import RunContext
from .cns import CNS


class RandomNeurons(CNS):
    def select(self, ctx: RunContext, m: int, concept: Concept) -> tuple[dict[str, torch.Tensor], dict]:
        masks, stats = super().select(ctx, m, concept)
        masks = random_like_counts(masks, ctx.seed + m)
        return masks, dict(mask_stats(masks), cns_statistics=stats["total"], rule="random, same count per layer as CNS")
