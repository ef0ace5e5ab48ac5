"""Low-rank adapters (LoRA, Hu et al., ICLR 2022) for the LoRA methods: C-LoRA, Orthogonal Adaptation,
Mix-of-Show (one file each beside this one).

The adapters are peft's (the library diffusers loads LoRA with): :func:`add_adapter` injects a
``peft`` LoRA adapter named after its stage (:func:`adapter_name`) into the target linears
(``peft.inject_adapter_in_model``; rank r, alpha = r, so scale 1), which become peft ``LoraLayer``
wrappers whose ``lora_A.<adapter>`` (down, r x in) and ``lora_B.<adapter>`` (up, out x r) train,
in fp32. Several adapters can be active in one layer (C-LoRA's earlier concepts, frozen). Between
stages no adapter is attached: each method writes its deltas into the weights (``merged_weight`` or
its own fusion) in ``merge``, then :func:`remove_adapters` puts the original ``nn.Linear`` modules
back, so the live model is a plain diffusers model again (evaluation, export). The sum is the
project's fp32 ``merged_weight``, the one ``load`` rebuilds from the files, not peft's layer
``merge``: the two are bit-identical on fp32 weights, while on bf16 weights peft adds each adapter
in bf16 (3 rank-16 adapters on a 320 -> 768 linear, CPU: 38% of the entries differ, 2.8x the
fp32 sum's error against an fp64 sum).

A stage's adapter is saved with ``peft.get_peft_model_state_dict`` in the file and key layout
diffusers' ``load_lora_weights`` reads (peft naming, as ``save_lora_weights`` packs it):
``pytorch_lora_weights.safetensors`` with ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``
(and ``text_encoder.<module>...``), fp32, the adapters' peft config in the metadata
(``lora_adapter_metadata``, as diffusers writes it).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from ..masking import MaskedAdam, row_mask
from ..concepts import Concept
from .base import TOKEN_FILE, Knob, Method, RunContext, SavedStage, StageFiles, StageFormatError, stage_key

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
LAYER_CHOICES = ("kv", "attention")
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_TEXT_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")

Factors = tuple[torch.Tensor, torch.Tensor]  # (A: r x in, B: out x r)


def rank_knob(example: str = "4") -> Knob:
    return Knob("rank", "int", 1, example=example)


def _linears(model: nn.Module, suffixes: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The linears of ``model`` whose names end with one of ``suffixes``; where peft wraps one
    (a ``LoraLayer``), the original linear it wraps (``get_base_layer``), under the same name."""
    out = {}
    for n, m in model.named_modules():
        if not n.endswith(suffixes):
            continue
        if isinstance(m, LoraLayer):
            out[n] = m.get_base_layer()
        elif isinstance(m, nn.Linear):
            out[n] = m
    return out


def unet_targets(unet: nn.Module, layers: str) -> dict[str, nn.Linear]:
    """The UNet linears a method adapts: ``kv``: every cross-attention ``attn2.to_k`` / ``to_v``;
    ``attention``: q, k, v and out of every attention (``attn1`` and ``attn2``), as Mix-of-Show."""
    if layers not in LAYER_CHOICES:
        raise ValueError(f"layers={layers!r}: choose one of {', '.join(LAYER_CHOICES)}")
    suffixes = ("attn2.to_k", "attn2.to_v") if layers == "kv" else tuple(f"{a}.{s}" for a in ("attn1", "attn2") for s in _ATTENTION)
    return _linears(unet, suffixes)


def text_targets(text_encoder: nn.Module) -> dict[str, nn.Linear]:
    """The text encoder's attention linears (q, k, v, out of every CLIP layer)."""
    return _linears(text_encoder, _TEXT_ATTENTION)


# ------------------------------------------------------------------ peft adapters
def adapter_name(m: int) -> str:
    """The peft adapter of stage ``m`` (0-based): ``c0001``, ``c0002``, ... Fixed width, so no
    name is part of another (peft's state-dict helpers select an adapter's keys by substring)."""
    return f"c{m + 1:04d}"


def lora_config(rank: int, modules: list[str]) -> LoraConfig:
    """peft's config of one adapter on the linears ``modules`` (full module names): rank r,
    alpha = r (scale 1), no dropout, no bias."""
    return LoraConfig(r=int(rank), lora_alpha=int(rank), lora_dropout=0.0, bias="none", target_modules=sorted(modules))


def add_adapter(model: nn.Module, modules: list[str], rank: int, name: str) -> dict[str, LoraLayer]:
    """Inject peft LoRA adapter ``name`` into the linears ``modules`` of ``model``
    (``inject_adapter_in_model``; earlier adapters stay), fp32, frozen; the run's random stream is
    left as it was (peft's own init draws from it; the methods set A and B themselves).
    Returns the peft layers by module name."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")  # several adapters: meant (C-LoRA)
        inject_adapter_in_model(lora_config(rank, modules), model, adapter_name=name)
    layers = dict(model.named_modules())
    out = {n: layers[n] for n in modules}
    for n, layer in out.items():
        if not isinstance(layer, LoraLayer) or name not in layer.lora_A:
            raise RuntimeError(f"peft did not wrap {n} with adapter {name!r}")
        for part in (layer.lora_A[name], layer.lora_B[name]):
            part.float().requires_grad_(False)  # in place: the same parameters, fp32 (peft gives them the base layer's dtype)
    return out


def factors(layer: LoraLayer, name: str) -> tuple[nn.Parameter, nn.Parameter]:
    """(A, B) of adapter ``name`` of a peft layer: ``lora_A.<name>.weight`` (r x in),
    ``lora_B.<name>.weight`` (out x r)."""
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def set_factors(layers: dict[str, LoraLayer], name: str, values: dict[str, Factors]) -> None:
    """Copy (A, B) per module into adapter ``name`` (fp32)."""
    with torch.no_grad():
        for n, (a, b) in values.items():
            pa, pb = factors(layers[n], name)
            pa.copy_(a)
            pb.copy_(b)


def load_adapter(model: nn.Module, name: str, values: dict[str, Factors]) -> None:
    """Set adapter ``name`` of ``model`` from saved (A, B) per module with peft's
    ``set_peft_model_state_dict``; every key must land."""
    state = {f"{n}.lora_{part}.weight": t for n, pair in values.items() for part, t in zip("AB", pair)}
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    if result.unexpected_keys:
        raise RuntimeError(f"peft did not take {len(result.unexpected_keys)} keys of adapter {name!r}, e.g. {result.unexpected_keys[0]}")


def activate(model: nn.Module, names: list[str]) -> None:
    """Make adapters ``names`` the active ones of every peft layer of ``model`` (peft's
    ``set_adapter`` of each layer), every adapter frozen (the stage unfreezes what it trains)."""
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            layer.set_adapter(list(names))  # (peft unfreezes the active ones)
            for part in (*layer.lora_A.values(), *layer.lora_B.values()):
                part.requires_grad_(False)


def remove_adapters(model: nn.Module) -> None:
    """Put the original linears back in place of peft's wrappers (diffusers' ``unload_lora``
    path: ``recurse_remove_peft_layers``) and drop peft's config: a plain model again. The wrapped
    weights are left as they are (no merge)."""
    recurse_remove_peft_layers(model)
    if "peft_config" in vars(model):
        del model.peft_config


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name`` of ``model`` in peft's key layout (``<module>.lora_A.weight``, no adapter
    name: ``get_peft_model_state_dict``), fp32 CPU copies."""
    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def kaiming_down(rank: int, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """LoRA's down-projection init (peft's ``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(in), 1/sqrt(in)))."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(rank, fan_in, generator=generator) * 2 - 1) * bound


def merged_weight(base: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
    """W = W_0 + sum_i ΔW_i (Orthogonal Adaptation's merge, Po et al. CVPR 2024, Sec. 3; C-LoRA's
    model after task t, W_0 + sum_{t'<=t} B_t' A_t', Smith et al. TMLR 2023), in fp32 then ``base``'s dtype."""
    w = base.float().clone()
    for d in deltas:
        w += d.to(w.device)
    return w.to(base.dtype)


# ------------------------------------------------------------------ the stage file
def lora_file(states: dict[str, dict[str, torch.Tensor]], configs: dict[str, LoraConfig], rank: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of ``pytorch_lora_weights.safetensors``, as diffusers'
    ``save_lora_weights`` packs it: ``{prefix: peft state}`` (prefix ``unet`` / ``text_encoder``)
    with keys ``<prefix>.<module>.lora_A.weight``, fp32; the metadata holds each prefix's peft
    config under ``lora_adapter_metadata`` (``<prefix>.r`` ...)."""
    tensors = {f"{prefix}.{k}": v for prefix, state in states.items() for k, v in state.items()}
    adapters = {}
    for prefix, cfg in configs.items():
        adapters.update({f"{prefix}.{k}": v for k, v in adapter_metadata(cfg).items()})
    meta = {"format": "pt", "rank": str(int(rank)), "alpha": str(int(rank)), ADAPTER_METADATA_KEY: json.dumps(adapters, indent=2, sort_keys=True)}
    return tensors, meta


def adapter_metadata(cfg: LoraConfig) -> dict:
    """The part of a peft ``LoraConfig`` that diffusers reads back from a LoRA file's metadata."""
    return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules), "lora_dropout": cfg.lora_dropout, "bias": cfg.bias}


def read_lora(stage: SavedStage, prefix: str, targets: dict[str, nn.Linear]) -> dict[str, Factors]:
    """(A, B) per target module of ``prefix`` from a stage's LoRA file; shapes checked against the model."""
    if LORA_FILE not in stage.tensors:
        raise StageFormatError(f"{stage.folder}: has no {LORA_FILE}. Delete that stage folder and rerun the run to redo it.")
    t = stage.tensors[LORA_FILE]
    out = {}
    for name, lin in targets.items():
        a, b = t.get(f"{prefix}.{name}.lora_A.weight"), t.get(f"{prefix}.{name}.lora_B.weight")
        if a is None or b is None or a.shape[1] != lin.in_features or b.shape[0] != lin.out_features or a.shape[0] != b.shape[1]:
            raise StageFormatError(
                f"{stage.folder}/{LORA_FILE}: no adapter of matching shape for {prefix}.{name}. "
                "The model config or method.layers changed since the run; restore with the run's original config."
            )
        out[name] = (a, b)
    return out


def delta_of(pair: Factors, device) -> torch.Tensor:
    """ΔW = B A (fp32) of a saved (A, B) pair."""
    a, b = pair
    return b.to(device).float() @ a.to(device).float()


# ------------------------------------------------------------------ the stage
@dataclass
class LoRAStage:
    """Stage ``key``: the adapters' trainable factors (one optimizer group per ``(name, params, lr)``
    of ``groups``) and the rows ``token_ids`` of ``embeddings``; ``penalty`` an extra loss term
    (C-LoRA's self-regularization), differentiable in the adapters."""

    key: str
    token_ids: list[int]
    groups: list[tuple[str, list[nn.Parameter], float]]
    embeddings: nn.Parameter
    lr_token: float
    penalty: Callable[[], torch.Tensor] | None = None
    trains_text_encoder: bool = False  # the module then does not cache the prior prompt's text embedding
    optimizer: MaskedAdam | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        for _, params, _ in self.groups:
            for p in params:
                p.requires_grad_(True)
        self.embeddings.requires_grad_(True)
        self.token_mask = row_mask(self.embeddings.shape[0], self.token_ids, self.embeddings.device)

    def _full(self, p: torch.Tensor) -> torch.Tensor:
        return torch.ones((), dtype=torch.bool, device=p.device)

    def trainable(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(p, self._full(p)) for _, params, _ in self.groups for p in params] + [(self.embeddings, self.token_mask)]

    def configure_optimizer(self) -> MaskedAdam:
        groups = [{"params": [(p, self._full(p)) for p in params], "lr": lr, "name": name} for name, params, lr in self.groups if params]
        groups.append({"params": [(self.embeddings, self.token_mask)], "lr": self.lr_token, "name": "token"})
        self.optimizer = MaskedAdam(groups)
        return self.optimizer

    def extra_loss(self, device: torch.device) -> torch.Tensor | None:
        return None if self.penalty is None else self.penalty()

    def after_backward(self, micro_batches: int = 1) -> None:
        if self.optimizer is not None:
            self.optimizer.gather_grads()

    def end(self) -> None:
        for _, params, _ in self.groups:
            for p in params:
                p.requires_grad_(False)
        self.embeddings.requires_grad_(False)


# ------------------------------------------------------------------ the methods' shared life
class LoRAMethod(Method):
    """A method that trains one new peft adapter per concept (plus the concept's token) and, in
    ``merge``, writes the adapters of stages 1..m into the weights (``compose``) and removes the
    adapters. Subclasses pick the targets, the down-projection's init (``down_init``), whether it
    trains, an extra loss (``penalty``), whether the earlier concepts' adapters are live and frozen
    while the next trains (``keeps_earlier_live``) and the composition (default: the sum of the
    deltas, ``merged_weight``)."""

    knobs = (
        rank_knob(),
        Knob("lr_lora", "float", 0.0, resumable=True),
        Knob("layers", "choice", choices=LAYER_CHOICES),
    )
    train_down = True
    resets_to_base = False  # True: each concept trains from the base model (begin_stage resets the targets)
    keeps_earlier_live = False  # True: stage m trains on W_0 with the adapters of stages 1..m-1 active and frozen

    def __init__(self, name: str, rank: int = 4, lr_lora: float = 1e-4, layers: str = "kv", **shared):
        super().__init__(name, **shared)
        self.rank, self.lr_lora, self.layers = int(rank), float(lr_lora), str(layers)
        self.saved: list[dict[str, dict[str, Factors]]] = []  # (A, B) per stage, fp32 CPU
        self.live: dict[str, dict[str, LoraLayer]] = {}  # the peft layers of the stage in training, by prefix
        self.adapter: str | None = None  # the peft adapter that trains

    # ------------------------------------------------------------ what a subclass picks
    def targets(self, ctx: RunContext) -> dict[str, dict[str, nn.Linear]]:
        """``{prefix: {module name: linear}}`` of every adapted linear (prefix: ``unet`` / ``text_encoder``)."""
        return {"unet": unet_targets(ctx.pipe.unet, self.layers)}

    def lr_of(self, prefix: str, ctx: RunContext) -> float:
        return self.lr_lora * ctx.kv_lr_scale

    def down_init(self, ctx: RunContext, m: int) -> Callable[[str, nn.Linear], torch.Tensor] | None:
        return None  # LoRA's random init

    def penalty(self, ctx: RunContext, m: int) -> Callable[[], torch.Tensor] | None:
        return None

    def compose(self, ctx: RunContext, saved: list[dict[str, dict[str, Factors]]]) -> None:
        """Write the model after the stages of ``saved`` into the targets' weights: W_0 + sum of deltas."""
        with torch.no_grad():
            for prefix, tg in self.targets(ctx).items():
                for name, lin in tg.items():
                    w = self.base[prefix][name]
                    lin.weight.copy_(merged_weight(w, [delta_of(s[prefix][name], w.device) for s in saved]))

    # ------------------------------------------------------------ adapters
    def live_factors(self) -> dict[str, dict[str, tuple[nn.Parameter, nn.Parameter]]]:
        """(A, B) of the training adapter per prefix and module (the peft parameters themselves)."""
        return {p: {n: factors(layer, self.adapter) for n, layer in layers.items()} for p, layers in self.live.items()}

    def unload(self, ctx: RunContext) -> None:
        """Remove every adapter from the adapted models (the weights stay as they are)."""
        for p in self.targets(ctx):
            remove_adapters(getattr(ctx.pipe, p))
        self.live, self.adapter = {}, None

    def attach(self, ctx: RunContext, m: int, init: dict[str, dict[str, Factors]], earlier: list[int] = ()) -> None:
        """Adapter ``adapter_name(m)`` set to ``init`` on every target (and, active with it, frozen,
        the saved adapters of the stages ``earlier``): ``self.live``."""
        self.adapter = adapter_name(m)
        for p, lins in self.targets(ctx).items():
            model, names = getattr(ctx.pipe, p), list(lins)
            for i in earlier:
                add_adapter(model, names, self.rank, adapter_name(i))
                load_adapter(model, adapter_name(i), self.saved[i][p])
            self.live[p] = add_adapter(model, names, self.rank, self.adapter)
            set_factors(self.live[p], self.adapter, init[p])
            activate(model, [*(adapter_name(i) for i in earlier), self.adapter])

    # ------------------------------------------------------------ life of a run
    def setup(self, ctx: RunContext) -> None:
        self.base = {p: {n: lin.weight.detach().clone() for n, lin in tg.items()} for p, tg in self.targets(ctx).items()}
        self.saved, self.live, self.adapter = [], {}, None

    def generator(self, ctx: RunContext, m: int) -> torch.Generator:
        return torch.Generator().manual_seed(1_000_003 * int(ctx.seed) + m)

    def begin_stage(self, ctx: RunContext, m: int, concept: Concept) -> LoRAStage:
        self.unload(ctx)
        self.saved = self.saved[:m]
        tg = self.targets(ctx)
        earlier = list(range(m)) if self.keeps_earlier_live else []
        if self.resets_to_base or earlier:
            with torch.no_grad():
                for p, lins in tg.items():
                    for n, lin in lins.items():
                        lin.weight.copy_(self.base[p][n])
        gen, down = self.generator(ctx, m), self.down_init(ctx, m)
        init = {}
        for p, lins in tg.items():  # A from ``down`` (default: LoRA's random init), B = 0
            init[p] = {}
            for n, lin in lins.items():
                a = down(n, lin) if down is not None else kaiming_down(self.rank, lin.in_features, gen)
                init[p][n] = (a.float(), torch.zeros(lin.out_features, a.shape[0]))
        self.attach(ctx, m, init, earlier)
        groups = [(f"lora_{p}", [q for a, b in fs.values() for q in ((a, b) if self.train_down else (b,))], self.lr_of(p, ctx))
                  for p, fs in self.live_factors().items()]
        return LoRAStage(key=stage_key(m), token_ids=[ctx.token_ids[concept.name]], groups=groups, embeddings=ctx.embeddings,
                         lr_token=self.lr_token * ctx.token_lr_scale, penalty=self.penalty(ctx, m), trains_text_encoder="text_encoder" in self.live)

    def end_stage(self, ctx: RunContext, m: int, concept: Concept) -> StageFiles:
        states = {p: adapter_state(getattr(ctx.pipe, p), self.adapter) for p in self.live}
        for p, layers in self.live.items():
            want = {f"{n}.lora_{part}.weight" for n in layers for part in "AB"}
            if set(states[p]) != want:
                raise RuntimeError(f"peft's state of adapter {self.adapter!r} in {p} has keys {sorted(set(states[p]) ^ want)[:3]} it should not have (or lacks them)")
        tensors, meta = lora_file(states, {p: lora_config(self.rank, list(layers)) for p, layers in self.live.items()}, self.rank)
        self.saved = self.saved[:m] + [{p: {n: (tensors[f"{p}.{n}.lora_A.weight"], tensors[f"{p}.{n}.lora_B.weight"]) for n in layers}
                                         for p, layers in self.live.items()}]
        n_params = sum(q.numel() for fs in self.live_factors().values() for a, b in fs.values() for q in ((a, b) if self.train_down else (b,)))
        return StageFiles(tensors={LORA_FILE: (tensors, meta), TOKEN_FILE: self.token_file(ctx, concept)},
                          info={"concept_entries": int(n_params), "lora_rank": self.rank})

    def merge(self, ctx: RunContext, m: int) -> None:
        """The adapters leave the model; the weights become the model after stages 1..m."""
        self.unload(ctx)
        self.compose(ctx, self.saved[: m + 1])

    def load(self, ctx: RunContext, stages: list[SavedStage]) -> None:
        self.unload(ctx)
        tg = self.targets(ctx)
        self.saved = [{p: read_lora(s, p, lins) for p, lins in tg.items()} for s in stages]
        self.set_token_rows(ctx, stages)
        self.compose(ctx, self.saved)

    def live_tensors(self, ctx: RunContext) -> list[torch.Tensor]:
        """The concepts' token rows, every adapted weight and the training adapter's factors."""
        weights = [lin.weight for lins in self.targets(ctx).values() for lin in lins.values()]
        lora = [q for fs in self.live_factors().values() for pair in fs.values() for q in pair]
        return [ctx.embeddings[list(ctx.token_ids.values())], *weights, *lora]
