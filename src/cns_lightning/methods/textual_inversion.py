"""Textual Inversion: Gal et al., "An Image is Worth One Word: Personalizing Text-to-Image
Generation using Textual Inversion", ICLR 2023 (a baseline of Liao et al., ICCV 2025).

Only the concept's own token embedding trains; the UNet is never changed, so nothing is forgotten
by construction. A stage keeps its token row (``token.safetensors``); folders of the release before
``methods/`` also hold (empty) K/V and mask files, which are not needed.
"""

from __future__ import annotations

from ..concepts import Concept
from .base import TOKEN_FILE, Method, RunContext, SavedStage, StageFiles, stage_key
from .stage import MaskedStage


class TextualInversion(Method):
    def __init__(self, name: str = "textual_inversion", **shared):
        super().__init__(name, **shared)

    def begin_stage(self, ctx: RunContext, m: int, concept: Concept) -> MaskedStage:
        return MaskedStage(key=stage_key(m), token_ids=[ctx.token_ids[concept.name]], kv={}, embeddings=ctx.embeddings,
                           lr_kv=0.0, lr_token=self.lr_token * ctx.token_lr_scale)

    def end_stage(self, ctx: RunContext, m: int, concept: Concept) -> StageFiles:
        return StageFiles(tensors={TOKEN_FILE: self.token_file(ctx, concept)}, info={"concept_entries": 0})

    def load(self, ctx: RunContext, stages: list[SavedStage]) -> None:
        self.set_token_rows(ctx, stages)
