"""Concept neuron selection, Eq. 3 to 6 of Liao et al. (ICCV 2025).

A "neuron" is one entry W[i, j] of a cross-attention ``attn2.to_k`` / ``attn2.to_v`` weight
(out x d). Selection runs once per concept, before its training stage:

* Eq. 3  ``importance_scores``: S(W, c) = |W| * (1 ||c||_2), the feature norm of the caption's text
  hidden states broadcast over W's rows (as in Wanda).
* Eq. 4  ``caption_mask`` (a threshold on S) and ``base_mask`` (AND over the concept's captions).
* Eq. 5  ``general_mask``: AND over the K calibration prompts.
* Eq. 6  ``concept_mask``: base AND NOT general.

The paper leaves these choices open; each is a knob (``method.selection`` in the config):
``threshold`` ("row_topk" as in Wanda, "layer_topk", "absolute"), ``ratio`` / ``value``,
``tokens`` (which token positions count in ||c||), and ``weights``: which W the scores of Eq. 3 read
in a continual run, "current" (the model as the earlier stages left it, W_{m-1}) or "base" (W_0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOKEN_RULES = ("all", "no_bos", "until_eos", "content")
WEIGHT_RULES = ("current", "base")
THRESHOLD_RULES = ("row_topk", "layer_topk", "absolute")


@dataclass
class SelectionConfig:
    threshold: str = "row_topk"
    ratio: float = 0.1  # share kept per row (row_topk) or per layer (layer_topk)
    value: float | None = None  # for threshold="absolute"
    tokens: str = "no_bos"
    weights: str = "current"  # W of Eq. 3 at stage m: "current" = W_{m-1}, "base" = W_0

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_RULES:
            raise ValueError(f"method.selection.weights={self.weights!r}: choose one of {WEIGHT_RULES}")
        if self.threshold not in THRESHOLD_RULES:
            raise ValueError(f"method.selection.threshold={self.threshold!r}: choose one of {THRESHOLD_RULES}")
        if self.tokens not in TOKEN_RULES:
            raise ValueError(f"method.selection.tokens={self.tokens!r}: choose one of {TOKEN_RULES}")
        if self.threshold == "absolute" and self.value is None:
            raise ValueError("method.selection.value must be set when method.selection.threshold=absolute")
        if self.threshold != "absolute" and not 0.0 < float(self.ratio) <= 1.0:
            raise ValueError(f"method.selection.ratio={self.ratio}: must be in (0, 1]")


def token_positions(input_ids: torch.Tensor, eos_token_id: int, rule: str = "no_bos") -> torch.Tensor:
    """Which token positions of a padded (s,) caption count in ||c||.

    ``all``: all s positions (padding included, as SD's UNet sees them); ``no_bos``: all but the
    start token; ``until_eos``: start token through the first end token; ``content``: the words
    only (no start, end or padding).
    """
    s = input_ids.shape[-1]
    pos = torch.arange(s, device=input_ids.device)
    eos_hits = (input_ids == eos_token_id).nonzero()
    eos = int(eos_hits[0]) if len(eos_hits) else s - 1
    if rule == "all":
        return torch.ones(s, dtype=torch.bool, device=input_ids.device)
    if rule == "no_bos":
        return pos >= 1
    if rule == "until_eos":
        return pos <= eos
    if rule == "content":
        return (pos >= 1) & (pos < eos)
    raise ValueError(f"unknown token rule {rule!r}; choose one of {TOKEN_RULES}")


def feature_norms(hidden_states: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """||c||_2 of Eq. 3: the L2 norm over tokens of each of the d input features, (s, d) -> (d,)."""
    c = hidden_states if positions is None else hidden_states[positions]
    return torch.linalg.vector_norm(c.float(), ord=2, dim=0)


def importance_scores(weight: torch.Tensor, cnorm: torch.Tensor) -> torch.Tensor:
    """Eq. 3: S(W, c) = |W| * (1 . ||c||_2), the (d,) feature norms broadcast over W's rows."""
    return weight.detach().float().abs() * cnorm.float().unsqueeze(0)


def threshold_mask(scores: torch.Tensor, cfg: SelectionConfig) -> torch.Tensor:
    """The threshold of Eq. 4 on one layer's scores (out x d) -> bool mask."""
    if cfg.threshold == "absolute":
        return scores > float(cfg.value)
    if cfg.threshold == "row_topk":
        k = max(1, round(cfg.ratio * scores.shape[1]))
        idx = scores.topk(k, dim=1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
    k = max(1, round(cfg.ratio * scores.numel()))  # layer_topk
    idx = scores.flatten().topk(k).indices
    return torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device).index_fill_(0, idx, True).view_as(scores)


def caption_mask(weight: torch.Tensor, cnorm: torch.Tensor, cfg: SelectionConfig) -> torch.Tensor:
    """Eq. 4 for one caption: threshold(S(W, c))."""
    return threshold_mask(importance_scores(weight, cnorm), cfg)


def intersect(masks: list[torch.Tensor]) -> torch.Tensor:
    """AND over a list of masks."""
    out = masks[0].clone()
    for m in masks[1:]:
        out &= m
    return out


def base_mask(weight: torch.Tensor, caption_norms: list[torch.Tensor], cfg: SelectionConfig) -> torch.Tensor:
    """Eq. 4: base mask = AND over the concept's N image captions of the per-caption masks."""
    return intersect([caption_mask(weight, c, cfg) for c in caption_norms])


def general_mask(weight: torch.Tensor, calibration_norms: list[torch.Tensor], cfg: SelectionConfig) -> torch.Tensor:
    """Eq. 5: general mask = AND over the K calibration prompts of the per-prompt masks."""
    return intersect([caption_mask(weight, c, cfg) for c in calibration_norms])


def concept_mask(base: torch.Tensor, general: torch.Tensor) -> torch.Tensor:
    """Eq. 6: concept mask = base AND NOT general (general neurons stay frozen)."""
    return base & ~general


def random_like_counts(masks: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The ``random_neurons`` ablation: per layer, the same number of entries, drawn uniformly (seeded)."""
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for name in sorted(masks):
        m = masks[name]
        k = int(m.sum())
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=g)[:k]] = True
        out[name] = flat.view(m.shape).to(m.device)
    return out


@torch.no_grad()
def encode_norms(text_encoder, tokenizer, prompts: list[str], rule: str) -> list[torch.Tensor]:
    """Text-encoder hidden states of each prompt (SD's conditioning) reduced to (d,) feature norms."""
    device = next(text_encoder.parameters()).device
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)
    hidden = text_encoder(ids)[0]
    return [feature_norms(hidden[i], token_positions(ids[i], tokenizer.eos_token_id, rule)) for i in range(len(prompts))]


@torch.no_grad()
def select_concept_neurons(
    kv_weights: dict[str, torch.Tensor],
    caption_norms: list[torch.Tensor],
    calibration_norms: list[torch.Tensor],
    cfg: SelectionConfig,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Eq. 3-6 on every K/V weight. Returns (concept masks by layer, statistics).

    Statistics per layer and in total: base, general and concept densities and the share of base
    neurons that are general (the paper reports about 53%).
    """
    masks, layers = {}, {}
    totals = dict(entries=0, base=0, general=0, concept=0, base_and_general=0)
    for name, w in kv_weights.items():
        base = base_mask(w, caption_norms, cfg)
        general = general_mask(w, calibration_norms, cfg)
        masks[name] = concept_mask(base, general)
        n_base, n_gen, n_con = int(base.sum()), int(general.sum()), int(masks[name].sum())
        n_shared = int((base & general).sum())
        layers[name] = dict(
            entries=w.numel(),
            base_density=n_base / w.numel(),
            general_density=n_gen / w.numel(),
            concept_density=n_con / w.numel(),
            general_share_of_base=n_shared / max(n_base, 1),
        )
        for k, v in zip(totals, (w.numel(), n_base, n_gen, n_con, n_shared)):
            totals[k] += v
    total = dict(
        entries=totals["entries"],
        concept_entries=totals["concept"],
        base_density=totals["base"] / totals["entries"],
        general_density=totals["general"] / totals["entries"],
        concept_density=totals["concept"] / totals["entries"],
        general_share_of_base=totals["base_and_general"] / max(totals["base"], 1),
    )
    return masks, dict(layers=layers, total=total, config=vars(cfg))


def mask_stats(masks: dict[str, torch.Tensor]) -> dict:
    """Density of a set of masks (used for the random / full / empty methods)."""
    n = sum(m.numel() for m in masks.values())
    k = sum(int(m.sum()) for m in masks.values())
    return dict(
        layers={name: dict(entries=m.numel(), concept_density=float(m.float().mean())) for name, m in masks.items()},
        total=dict(entries=n, concept_entries=k, concept_density=k / max(n, 1)),
    )
