"""Concept Neuron Selection (CNS): Liao et al., "Continual Personalization for Diffusion Models", ICCV 2025.

Concept m trains only its concept neurons (Eq. 3-6: entries of the cross-attention K/V weights that
matter for its captions and not for general prompts) and its own token, with L_reg (Eq. 7) on the
neurons earlier concepts also own. One model holds every concept; a stage keeps the K/V values at
the union of masks so far, its own mask and its token row (``kv_store``: the compact format).

Knobs (``src/cns_lightning/conf/method/cns.yaml``): ``selection`` (the open choices of Eq. 3-4), ``lambda1`` /
``lambda2`` (Eq. 7), ``lr_neurons``. ``no_reg`` (Table 2) is this method with lambda1 = lambda2 = 0.
"""

from __future__ import annotations

import torch

from ..concepts import Concept
from ..models import cross_attention_kv
from ..selection import THRESHOLD_RULES, TOKEN_RULES, WEIGHT_RULES, SelectionConfig, encode_norms, select_concept_neurons
from ..masking import union_masks
from .base import TOKEN_FILE, Knob, Method, RunContext, SavedStage, StageFiles, StageFormatError, stage_key
from .kv_store import KV_FILE, MASKS_FILE, apply_kv, kv_file, mask_file, read_masks
from .stage import MaskedStage, masked_stage


class CNS(Method):
    knobs = (
        Knob("lr_neurons", "float", 0.0, resumable=True),
        Knob("lambda1", "float", 0.0, resumable=True),
        Knob("lambda2", "float", 0.0, resumable=True),
        Knob("selection.threshold", "choice", choices=THRESHOLD_RULES),
        Knob("selection.ratio", "float", 0.0, 1.0),
        Knob("selection.value", "float_or_null"),
        Knob("selection.tokens", "choice", choices=TOKEN_RULES),
        Knob("selection.weights", "choice", choices=WEIGHT_RULES, added=True, before="current"),  # folders made before it: current
    )

    def __init__(self, name: str = "cns", selection: dict | None = None, lambda1: float = 1.0, lambda2: float = 1.0,
                 lr_neurons: float = 3e-5, **shared):
        super().__init__(name, **shared)
        self.selection = SelectionConfig(**dict(selection or {}))
        self.lambda1, self.lambda2 = float(lambda1), float(lambda2)
        self.lr_neurons = float(lr_neurons)
        self.masks: list[dict[str, torch.Tensor]] = []  # concept masks of stages 1..m, on the model's device
        self._selection: dict = {}

    # ----------------------------------------------------------------- life of a run
    def setup(self, ctx: RunContext) -> None:
        """W_0 of Eq. 7 (the K/V weights before any concept); the calibration norms of Eq. 5 are
        computed once, at the first selection (the text encoder stays fixed but for the new tokens)."""
        self.initial = {n: p.detach().clone() for n, p in cross_attention_kv(ctx.pipe.unet).items()}
        self._calibration = None
        self.masks = []

    def select(self, ctx: RunContext, m: int, concept: Concept) -> tuple[dict[str, torch.Tensor], dict]:
        """Eq. 3-6 on the K/V that ``selection.weights`` names: the live ones (W_{m-1}) or W_0 (then
        earlier stages do not move the selection)."""
        if self.selection.weights == "base":
            return self.select_on(ctx, concept, self.initial)
        return self.select_on(ctx, concept, {n: p.detach() for n, p in cross_attention_kv(ctx.pipe.unet).items()})

    def select_on(self, ctx: RunContext, concept: Concept, kv: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """Eq. 3-6: the concept's masks and their statistics, scoring the weights ``kv``."""
        te, tok = ctx.pipe.text_encoder, ctx.pipe.tokenizer
        if self._calibration is None:
            self._calibration = encode_norms(te, tok, ctx.calibration_prompts, self.selection.tokens)
        caption_norms = encode_norms(te, tok, concept.captions(ctx.cache_dir), self.selection.tokens)
        return select_concept_neurons(kv, caption_norms, self._calibration, self.selection)

    def begin_stage(self, ctx: RunContext, m: int, concept: Concept) -> MaskedStage:
        """The concept's masks (``select``), then a stage training only those K/V entries and its
        token, with L_reg on M = mask_m AND (OR of earlier masks); it starts from the current model."""
        masks, self._selection = self.select(ctx, m, concept)
        kv = cross_attention_kv(ctx.pipe.unet)
        device = next(ctx.pipe.unet.parameters()).device
        self.masks = self.masks[:m] + [{n: masks[n].bool().to(device) for n in kv}]
        return masked_stage(
            stage_key(m), ctx.pipe.unet, ctx.embeddings, [ctx.token_ids[concept.name]], self.masks[m], self.masks[:m], self.initial,
            lr_kv=self.lr_neurons * ctx.kv_lr_scale, lr_token=self.lr_token * ctx.token_lr_scale, lambda1=self.lambda1, lambda2=self.lambda2,
        )

    def end_stage(self, ctx: RunContext, m: int, concept: Concept) -> StageFiles:
        """K/V at the union of masks 1..m as fp16 deltas (the live weights rounded to match), the
        concept's mask, its token row, the selection statistics."""
        kv = cross_attention_kv(ctx.pipe.unet)
        return StageFiles(
            tensors={
                KV_FILE: kv_file(dict(kv), self.initial, self.masks[: m + 1]),
                MASKS_FILE: mask_file(self.masks[m]),
                TOKEN_FILE: self.token_file(ctx, concept),
            },
            json={"selection.json": self._selection},
            info={"concept_entries": int(sum(int(x.sum()) for x in self.masks[m].values()))},
        )

    def load(self, ctx: RunContext, stages: list[SavedStage]) -> None:
        """Masks 1..n and token rows 1..n from their stages; K/V of stage n at the union of masks."""
        kv = cross_attention_kv(ctx.pipe.unet)
        device = next(ctx.pipe.unet.parameters()).device
        self.masks = []
        for s in stages:
            for f in (KV_FILE, MASKS_FILE, TOKEN_FILE):
                if f not in s.tensors:
                    raise StageFormatError(f"{s.folder}: has no {f}, so method {self.name!r} cannot load it. Delete that stage folder and rerun the run to redo it.")
            masks = read_masks(s.tensors[MASKS_FILE], s.metadata[MASKS_FILE])
            if set(masks) != set(kv) or any(tuple(masks[n].shape) != tuple(kv[n].shape) for n in kv):
                raise StageFormatError(
                    f"{s.folder}/{MASKS_FILE}: its layers or shapes do not match the K/V layers of the run's model. "
                    "The model config or its weights changed since the run; restore with the original model."
                )
            self.masks.append({n: masks[n].to(device) for n in kv})
        self.set_token_rows(ctx, stages)
        last = stages[-1]
        values = last.tensors[KV_FILE]
        count = {n: int(u.sum()) for n, u in union_masks(self.masks).items()}
        bad = [n for n in kv if n not in values or values[n].numel() != count[n]]
        if bad:
            raise StageFormatError(
                f"{last.folder}/{KV_FILE}: values for layer {bad[0]} do not match the union of masks 1..{len(stages)}. "
                "Delete that stage folder and rerun the run to redo it."
            )
        apply_kv(kv, self.initial, self.masks, values, deltas=last.metadata[KV_FILE].get("format") == "delta-fp16")
