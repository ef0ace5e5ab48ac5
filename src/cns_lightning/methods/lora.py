"""Low-rank adapters (LoRA, Hu et al., ICLR 2022) for the LoRA methods: C-LoRA, Orthogonal Adaptation,
Mix-of-Show (one file each beside this one).

peft is not installed in this project's environment, so the adapter is a small module of its own:
``LoRA`` holds ``lora_A`` (down, r x in) and ``lora_B`` (up, out x r), is added as a child of the
``nn.Linear`` it adapts (so it is in the model's ``named_parameters`` while a stage trains) and adds
``x A^T B^T`` to the linear's output through a forward hook (scale 1: alpha = r). Between stages
no adapter is attached: each method writes its deltas into the weights (``merged_weight`` or its own
fusion) in ``merge``, so the live model is a plain diffusers model again (evaluation, export).

A stage's adapters are saved in the file and key layout diffusers' ``load_lora_weights`` reads
(peft naming): ``pytorch_lora_weights.safetensors`` with ``unet.<module>.lora_A.weight`` /
``.lora_B.weight`` (and ``text_encoder.<module>...`` for text-encoder adapters), fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..masking import MaskedAdam, row_mask
from ..concepts import Concept
from .base import TOKEN_FILE, Knob, Method, RunContext, SavedStage, StageFiles, StageFormatError, stage_key

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LAYER_CHOICES = ("kv", "attention")
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_TEXT_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


def rank_knob(example: str = "4") -> Knob:
    return Knob("rank", "int", 1, example=example)


def unet_targets(unet: nn.Module, layers: str) -> dict[str, nn.Linear]:
    """The UNet linears a method adapts: ``kv``: every cross-attention ``attn2.to_k`` / ``to_v``;
    ``attention``: q, k, v and out of every attention (``attn1`` and ``attn2``), as Mix-of-Show."""
    if layers not in LAYER_CHOICES:
        raise ValueError(f"layers={layers!r}: choose one of {', '.join(LAYER_CHOICES)}")
    suffixes = ("attn2.to_k", "attn2.to_v") if layers == "kv" else tuple(f"{a}.{s}" for a in ("attn1", "attn2") for s in _ATTENTION)
    return {n: m for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n.endswith(suffixes)}


def text_targets(text_encoder: nn.Module) -> dict[str, nn.Linear]:
    """The text encoder's attention linears (q, k, v, out of every CLIP layer)."""
    return {n: m for n, m in text_encoder.named_modules() if isinstance(m, nn.Linear) and n.endswith(_TEXT_ATTENTION)}


class LoRA(nn.Module):
    """One adapter: ``forward(x) = x A^T B^T`` (A: r x in, B: out x r)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, train_down: bool = True):
        super().__init__()
        self.lora_A = nn.Parameter(down, requires_grad=False)
        self.lora_B = nn.Parameter(up, requires_grad=False)
        self.train_down = bool(train_down)
        self._hook = None
        self.__dict__["_host"] = None  # the adapted linear: a plain reference, not a child module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype)

    def trainable(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B] if self.train_down else [self.lora_B]

    def delta(self) -> torch.Tensor:
        """ΔW = B A (out x in, fp32)."""
        return self.lora_B.detach().float() @ self.lora_A.detach().float()

    def attach(self, linear: nn.Linear) -> "LoRA":
        """Make this adapter a child of ``linear`` and add its output to ``linear``'s."""
        self.to(linear.weight.device)
        linear.add_module("lora", self)
        self.__dict__["_host"] = linear
        self._hook = linear.register_forward_hook(lambda mod, args, out: out + self(args[0]))
        return self

    def detach_from_host(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            delattr(self._host, "lora")
        self._hook = None
        self.__dict__["_host"] = None


def kaiming_down(rank: int, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """LoRA's down-projection init (peft's ``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(in), 1/sqrt(in)))."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(rank, fan_in, generator=generator) * 2 - 1) * bound


def new_adapters(targets: dict[str, nn.Linear], rank: int, generator: torch.Generator,
                 down: Callable[[str, nn.Linear], torch.Tensor] | None = None, train_down: bool = True) -> dict[str, LoRA]:
    """One attached adapter per target: A from ``down`` (default: LoRA's random init), B = 0."""
    out = {}
    for name, lin in targets.items():
        a = down(name, lin) if down is not None else kaiming_down(rank, lin.in_features, generator)
        out[name] = LoRA(a.float().clone(), torch.zeros(lin.out_features, a.shape[0]), train_down=train_down).attach(lin)
    return out


def detach_all(adapters: dict[str, LoRA]) -> None:
    for a in adapters.values():
        a.detach_from_host()


def merged_weight(base: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
    """W = W_0 + sum_i ΔW_i (Orthogonal Adaptation's merge, Po et al. CVPR 2024, Sec. 3; C-LoRA's
    model after task t, W_0 + sum_{t'<=t} B_t' A_t', Smith et al. TMLR 2023), in fp32 then ``base``'s dtype."""
    w = base.float().clone()
    for d in deltas:
        w += d.to(w.device)
    return w.to(base.dtype)


# ------------------------------------------------------------------ the stage file
def lora_file(adapters: dict[str, dict[str, LoRA]], rank: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of ``pytorch_lora_weights.safetensors``: ``{prefix: {module: LoRA}}``
    with prefix ``unet`` / ``text_encoder``, in diffusers' peft key layout, fp32."""
    tensors = {}
    for prefix, ads in adapters.items():
        for name, a in ads.items():
            tensors[f"{prefix}.{name}.lora_A.weight"] = a.lora_A.detach().float().cpu().clone()
            tensors[f"{prefix}.{name}.lora_B.weight"] = a.lora_B.detach().float().cpu().clone()
    return tensors, {"format": "diffusers-peft-lora", "rank": str(int(rank)), "alpha": str(int(rank))}


def read_lora(stage: SavedStage, prefix: str, targets: dict[str, nn.Linear]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
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


def delta_of(pair: tuple[torch.Tensor, torch.Tensor], device) -> torch.Tensor:
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
    """A method that trains one new set of adapters per concept (plus the concept's token) and,
    in ``merge``, writes the adapters of stages 1..m into the weights (``compose``). Subclasses pick
    the targets, the down-projection's init (``down_init``), whether it trains, an extra loss
    (``penalty``) and the composition (default: the sum of the deltas, ``merged_weight``)."""

    knobs = (
        rank_knob(),
        Knob("lr_lora", "float", 0.0, resumable=True),
        Knob("layers", "choice", choices=LAYER_CHOICES),
    )
    train_down = True
    resets_to_base = False  # True: each concept trains from the base model (begin_stage resets the targets)

    def __init__(self, name: str, rank: int = 4, lr_lora: float = 1e-4, layers: str = "kv", **shared):
        super().__init__(name, **shared)
        self.rank, self.lr_lora, self.layers = int(rank), float(lr_lora), str(layers)
        self.saved: list[dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = []  # (A, B) per stage, fp32 CPU
        self.live: dict[str, dict[str, LoRA]] = {}

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

    def compose(self, ctx: RunContext, saved: list[dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]]) -> None:
        """Write the model after the stages of ``saved`` into the targets' weights: W_0 + sum of deltas."""
        with torch.no_grad():
            for prefix, tg in self.targets(ctx).items():
                for name, lin in tg.items():
                    w = self.base[prefix][name]
                    lin.weight.copy_(merged_weight(w, [delta_of(s[prefix][name], w.device) for s in saved]))

    # ------------------------------------------------------------ life of a run
    def setup(self, ctx: RunContext) -> None:
        self.base = {p: {n: lin.weight.detach().clone() for n, lin in tg.items()} for p, tg in self.targets(ctx).items()}
        self.saved, self.live = [], {}

    def generator(self, ctx: RunContext, m: int) -> torch.Generator:
        return torch.Generator().manual_seed(1_000_003 * int(ctx.seed) + m)

    def begin_stage(self, ctx: RunContext, m: int, concept: Concept) -> LoRAStage:
        detach_all({f"{p}.{n}": a for p, ads in self.live.items() for n, a in ads.items()})
        self.saved = self.saved[:m]
        tg = self.targets(ctx)
        if self.resets_to_base:
            with torch.no_grad():
                for p, lins in tg.items():
                    for n, lin in lins.items():
                        lin.weight.copy_(self.base[p][n])
        gen, init = self.generator(ctx, m), self.down_init(ctx, m)
        self.live = {p: new_adapters(lins, self.rank, gen, init, self.train_down) for p, lins in tg.items()}
        groups = [(f"lora_{p}", [q for a in ads.values() for q in a.trainable()], self.lr_of(p, ctx)) for p, ads in self.live.items()]
        return LoRAStage(key=stage_key(m), token_ids=[ctx.token_ids[concept.name]], groups=groups, embeddings=ctx.embeddings,
                         lr_token=self.lr_token * ctx.token_lr_scale, penalty=self.penalty(ctx, m), trains_text_encoder="text_encoder" in self.live)

    def end_stage(self, ctx: RunContext, m: int, concept: Concept) -> StageFiles:
        tensors, meta = lora_file(self.live, self.rank)
        self.saved = self.saved[:m] + [{p: {n: (tensors[f"{p}.{n}.lora_A.weight"], tensors[f"{p}.{n}.lora_B.weight"]) for n in ads}
                                         for p, ads in self.live.items()}]
        n_params = sum(q.numel() for ads in self.live.values() for a in ads.values() for q in a.trainable())
        return StageFiles(tensors={LORA_FILE: (tensors, meta), TOKEN_FILE: self.token_file(ctx, concept)},
                          info={"concept_entries": int(n_params), "lora_rank": self.rank})

    def merge(self, ctx: RunContext, m: int) -> None:
        """The adapters of stage m leave the model; the weights become the model after stages 1..m."""
        detach_all({f"{p}.{n}": a for p, ads in self.live.items() for n, a in ads.items()})
        self.live = {}
        self.compose(ctx, self.saved[: m + 1])

    def load(self, ctx: RunContext, stages: list[SavedStage]) -> None:
        tg = self.targets(ctx)
        self.saved = [{p: read_lora(s, p, lins) for p, lins in tg.items()} for s in stages]
        self.set_token_rows(ctx, stages)
        self.compose(ctx, self.saved)

    def live_tensors(self, ctx: RunContext) -> list[torch.Tensor]:
        return [*super().live_tensors(ctx), *[q for ads in self.live.values() for a in ads.values() for q in (a.lora_A, a.lora_B)]]
