"""Mix-of-Show: Gu et al., "Mix-of-Show: Decentralized Low-Rank Adaptation for Multi-Concept
Customization of Diffusion Models", NeurIPS 2023 (a baseline of Liao et al., ICCV 2025, Table 1).

Each concept trains alone from the base model (``begin_stage`` resets the adapted weights): LoRA
(peft adapters) on the text encoder's attention linears (lr ``lr_text``) and on every UNet attention
linear, q/k/v/out of attn1 and attn2 (``lr_lora``), plus the concept's token. After stage m, gradient fusion
(:func:`gradient_fusion`) writes into every adapted layer the weight that best reproduces each
concept's own LoRA outputs on the inputs that layer saw while sampling that concept's own model
(the concept's prompts, ``fusion_prompts`` of them, ``fusion_steps`` sampler steps): per layer
W* = argmin_W sum_i ||(W_0 + ΔW_i) X_i - W X_i||^2. Mix-of-Show solves it with L-BFGS on stored
activations; here each layer keeps only the running sums of X_i^T X_i and ΔW_i X_i^T X_i over the
concepts so far (exact for this objective: two matrices per layer, whatever the number of concepts)
and the solution is the closed form, the minimiser nearest W_0.

Tokens (``layerwise_tokens``, default true, as ED-LoRA): each concept's token has one embedding
per UNet cross-attention layer (``methods/layerwise_tokens.py``: ``<new1_p0>`` .. ``<new1_p{L-1}>``,
L = 16 on SD-1.5, each layer's ``attn2`` fed the text states of the prompt with its own token);
they train with lr ``lr_token``; the concept's own row ``<new1>`` does not reach the UNet and holds
the mean of its layer rows (written at the end of each stage). A stage keeps ``token.safetensors``
(that mean) and ``layerwise_tokens.safetensors`` (the L rows, fp32, with the layer names). The
pipeline is made layer-wise in ``setup`` (``LayerwiseTokens.install``), so the loop's training
step (the stage's ``text_states``), the sampler (prior images, evaluation), gradient fusion's
recording and ``generate`` / ``restore`` all use the layer-wise states. ``layerwise_tokens=false``:
one embedding per concept, the project's (the folders of runs made before the knob).

Export (``cns_lightning.export``): a plain ``StableDiffusionPipeline`` feeds every layer the same
states, so it cannot hold the trained model exactly. The export holds the fused weights, the layer
tokens in the tokenizer and text encoder, and ``<new1>`` = the mean of its layer rows (what a plain
pipeline then uses at every layer: an approximation); ``cns_layerwise_tokens.json`` lists each
concept's layer tokens in layer order and the model card says so. The exact model:
``python -m cns_lightning.generate RUN_DIR`` (or ``LayerwiseTokens(...).install(pipe)``).

Knobs (``conf/method/mix_of_show.yaml``), defaults from TencentARC/Mix-of-Show's ED-LoRA configs
(Apache-2.0): rank 4, UNet lr 1e-4, text-encoder lr 1e-5, embedding lr 1e-3, layer-wise tokens.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..concepts import Concept
from . import layerwise_tokens as lw
from .base import Knob, RunContext, SavedStage, StageFiles, StageFormatError
from .lora import LoRAMethod, activate, add_adapter, adapter_name, delta_of, load_adapter, rank_knob, remove_adapters, text_targets, unet_targets, LAYER_CHOICES

PROMPTS_FILE = "fusion_prompts.json"
LAYERWISE_FILE = "layerwise_tokens.safetensors"  # a concept's layer-wise token rows (L x d, fp32)


def gradient_fusion(base: torch.Tensor, deltas: list[torch.Tensor], grams: list[torch.Tensor], rcond: float = 1e-10) -> torch.Tensor:
    """Mix-of-Show's gradient fusion of one layer (Gu et al. 2023, gradient fusion), in closed form:
    W* = argmin_W sum_i ||(W_0 + ΔW_i) X_i^T - W X_i^T||_F^2 with G_i = X_i^T X_i (in x in):
    W* = W_0 + (sum_i ΔW_i G_i) (sum_i G_i)^+, the minimiser nearest W_0 (where no concept's inputs
    reach, the weight stays W_0, as L-BFGS started at W_0 leaves it). fp64, then ``base``'s dtype."""
    g = sum(x.double() for x in grams)
    rhs = sum(d.double() @ x.double() for d, x in zip(deltas, grams))
    return fusion_solution(base, rhs, g, rcond)


def fusion_solution(base: torch.Tensor, rhs: torch.Tensor, gram: torch.Tensor, rcond: float = 1e-10) -> torch.Tensor:
    """W_0 + R G^+ for the running sums R = sum_i ΔW_i G_i and G = sum_i G_i of :func:`gradient_fusion`."""
    pinv = torch.linalg.pinv(gram.double(), rtol=rcond, hermitian=True)
    return (base.double() + rhs.double() @ pinv).to(base.dtype)


class GramRecorder:
    """Forward hooks that add X^T X of every input row seen by each linear (fp64)."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.grams = {n: torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64, device=lin.weight.device) for n, lin in linears.items()}
        self.handles = [lin.register_forward_hook(self._hook(n)) for n, lin in linears.items()]

    def _hook(self, name: str):
        def hook(mod, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            self.grams[name] += x.t() @ x

        return hook

    def close(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return self.grams


class MixOfShow(LoRAMethod):
    knobs = (
        rank_knob("4"),
        Knob("lr_lora", "float", 0.0, resumable=True),
        Knob("lr_text", "float", 0.0, resumable=True),
        Knob("layers", "choice", choices=LAYER_CHOICES),
        Knob("fusion_prompts", "int", 1, example="4"),
        Knob("fusion_steps", "int", 1, example="25"),
        Knob("fusion_guidance", "float", 0.0, example="7.5"),
        Knob("layerwise_tokens", "bool", added=True, before=False),  # folders made before it: one token per concept
    )
    resets_to_base = True

    def __init__(self, name: str = "mix_of_show", rank: int = 4, lr_lora: float = 1e-4, lr_text: float = 1e-5, layers: str = "attention",
                 fusion_prompts: int = 4, fusion_steps: int = 25, fusion_guidance: float = 7.5, layerwise_tokens: bool = False, **shared):
        # layerwise_tokens: the config's default is true (conf/method/mix_of_show.yaml); false here
        # is what a run folder written before the knob trained (one token per concept)
        super().__init__(name, rank=rank, lr_lora=lr_lora, layers=layers, **shared)
        self.lr_text = float(lr_text)
        self.layerwise_tokens = bool(layerwise_tokens)
        self.tokens: lw.LayerwiseTokens | None = None
        self.fusion_prompts, self.fusion_steps, self.fusion_guidance = int(fusion_prompts), int(fusion_steps), float(fusion_guidance)
        self.prompts: list[list[str]] = []
        self._reset_sums()

    def targets(self, ctx: RunContext) -> dict[str, dict[str, nn.Linear]]:
        return {"unet": unet_targets(ctx.pipe.unet, self.layers), "text_encoder": text_targets(ctx.pipe.text_encoder)}

    def lr_of(self, prefix: str, ctx: RunContext) -> float:
        """UNet adapters scale with the model's ``kv_lr_scale`` (its UNet weights' rate), the text
        encoder's with ``token_lr_scale`` (its text-encoder side, as the token's; docs/knobs.md)."""
        return self.lr_text * ctx.token_lr_scale if prefix == "text_encoder" else self.lr_lora * ctx.kv_lr_scale

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        self.prompts = []
        self._reset_sums()
        if self.layerwise_tokens:
            self.tokens = lw.add_layer_tokens(ctx.pipe, ctx.concepts, ctx.token_ids)  # installed on the pipeline
        else:
            lw.uninstall(ctx.pipe)
            self.tokens = None

    # ------------------------------------------------------------ layer-wise tokens
    def layer_rows(self, ctx: RunContext, concept: Concept) -> list[int]:
        return self.tokens.layer_ids[ctx.token_ids[concept.name]] if self.tokens is not None else []

    def begin_stage(self, ctx: RunContext, m: int, concept: Concept):
        stage = super().begin_stage(ctx, m, concept)
        if self.tokens is None:
            return stage
        with torch.no_grad():  # each concept's layer tokens start again from its token's row
            ctx.embeddings[self.layer_rows(ctx, concept)] = ctx.embeddings[ctx.token_ids[concept.name]].clone()
        stage = dataclasses.replace(stage, token_ids=[*stage.token_ids, *self.layer_rows(ctx, concept)])
        stage.text_states = self.tokens.encode  # the module encodes the stage's prompts layer-wise
        return stage

    def live_tensors(self, ctx: RunContext) -> list[torch.Tensor]:
        rows = [i for c in ctx.concepts for i in self.layer_rows(ctx, c)]
        return [*super().live_tensors(ctx), *([ctx.embeddings[rows]] if rows else [])]

    def layerwise_file(self, ctx: RunContext, concept: Concept) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        rows = ctx.embeddings[self.layer_rows(ctx, concept)].detach().float().cpu().clone()
        names = ctx.pipe.tokenizer.convert_ids_to_tokens(self.layer_rows(ctx, concept))
        return {"embeddings": rows}, lw.metadata(self.tokens, names)

    def set_layer_rows(self, ctx: RunContext, stages: list[SavedStage]) -> None:
        """Write each saved stage's layer-wise rows into the text encoder's embeddings."""
        emb = ctx.embeddings
        for s, concept in zip(stages, ctx.concepts):
            if LAYERWISE_FILE not in s.tensors:
                raise StageFormatError(
                    f"{s.folder}: has no {LAYERWISE_FILE}: its concept was trained with one token embedding (method.layerwise_tokens=false, "
                    "or before the knob existed). Resume or restore it with method.layerwise_tokens=false."
                )
            rows = s.tensors[LAYERWISE_FILE]["embeddings"]
            want = (self.tokens.count, emb.shape[1])
            if tuple(rows.shape) != want:
                raise StageFormatError(
                    f"{s.folder}/{LAYERWISE_FILE}: rows of shape {tuple(rows.shape)}, but the model has {want[0]} cross-attention layers of "
                    f"{want[1]} text features. Restore with the run's original model."
                )
            with torch.no_grad():
                emb[self.layer_rows(ctx, concept)] = rows.to(emb.device, emb.dtype)

    def _reset_sums(self) -> None:
        # Running sums of gradient fusion per layer, (sum_i ΔW_i G_i, sum_i G_i) over concepts
        # 1..fused (fp64): memory of two matrices per layer, whatever the number of concepts.
        self.sums: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.fused = 0

    def end_stage(self, ctx: RunContext, m: int, concept: Concept) -> StageFiles:
        if self.tokens is not None:  # the concept's own row: the mean of its layer rows (what a plain pipeline uses)
            with torch.no_grad():
                emb = ctx.embeddings
                emb[ctx.token_ids[concept.name]] = emb[self.layer_rows(ctx, concept)].float().mean(0).to(emb.dtype)
        files = super().end_stage(ctx, m, concept)
        if self.tokens is not None:
            files.tensors[LAYERWISE_FILE] = self.layerwise_file(ctx, concept)
            files.info["layerwise_tokens"] = self.tokens.count
        self.prompts = self.prompts[:m] + [list(concept.captions(ctx.cache_dir))[: self.fusion_prompts]]
        files.json[PROMPTS_FILE] = {"prompts": self.prompts[m]}
        return files

    @torch.no_grad()
    def record(self, ctx: RunContext, i: int) -> dict[str, dict[str, torch.Tensor]]:
        """G_i per adapted layer: the inputs each layer sees while concept i's own model (base weights
        + its adapters, attached now) samples its prompts (text encoder and UNet, with guidance)."""
        tg = self.targets(ctx)
        recorders = {p: GramRecorder(lins) for p, lins in tg.items()}
        try:
            gen = torch.Generator(device="cpu").manual_seed(int(ctx.seed) + i)
            ctx.pipe(self.prompts[i], num_inference_steps=self.fusion_steps, guidance_scale=self.fusion_guidance,
                     generator=gen, output_type="latent")
        finally:
            grams = {p: r.close() for p, r in recorders.items()}
        return grams

    def concept_grams(self, ctx: RunContext, i: int) -> dict[str, dict[str, torch.Tensor]]:
        """G_i per adapted layer, recorded on concept i's own model (base weights + its saved
        adapters, a peft adapter attached for the recording only; the adapted weights are left at W_0)."""
        tg = self.targets(ctx)
        try:
            with torch.no_grad():
                for p, lins in tg.items():
                    for n, lin in lins.items():
                        lin.weight.copy_(self.base[p][n])
                    model, name = getattr(ctx.pipe, p), adapter_name(i)
                    add_adapter(model, list(lins), self.rank, name)
                    load_adapter(model, name, self.saved[i][p])
                    activate(model, [name])
            return self.record(ctx, i)
        finally:
            for p in tg:
                remove_adapters(getattr(ctx.pipe, p))

    def compose(self, ctx: RunContext, saved) -> None:
        """Gradient fusion of stages 1..len(saved): each new concept's Gram matrices recorded once
        and added to the running sums, then :func:`fusion_solution` per layer."""
        if len(saved) < self.fused:
            self._reset_sums()
        for i in range(self.fused, len(saved)):
            grams = self.concept_grams(ctx, i)
            for p, lins in self.targets(ctx).items():
                layer = self.sums.setdefault(p, {})
                for n in lins:
                    g = grams[p][n]
                    r = delta_of(saved[i][p][n], g.device).double() @ g
                    old = layer.get(n)
                    layer[n] = (r, g) if old is None else (old[0] + r, old[1] + g)
            self.fused = i + 1
        with torch.no_grad():
            for p, lins in self.targets(ctx).items():
                for n, lin in lins.items():
                    r, g = self.sums[p][n]
                    lin.weight.copy_(fusion_solution(self.base[p][n], r, g))

    def load(self, ctx: RunContext, stages: list[SavedStage]) -> None:
        self.prompts = [list(s.json.get(PROMPTS_FILE, {}).get("prompts", [])) for s in stages]
        self._reset_sums()
        if self.tokens is not None:  # before the fusion: its recording samples each concept's prompts layer-wise
            self.set_layer_rows(ctx, stages)
        super().load(ctx, stages)
