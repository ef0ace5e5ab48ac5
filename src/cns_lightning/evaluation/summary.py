"""Headline numbers of one run, computed from its evaluator state (``eval/results.json``).

"single" numbers are those of the final model (the last evaluated stage), averaged over the
learned concepts, as the paper's Table 1 reports after all concepts are learned. Every number
exists twice: ``mean`` (over all samples: the honest default) and ``best`` (the paper's protocol:
per prompt the best of N samples, then averaged), labelled with N.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .forgetting import last_stage, summarise
from .metrics import learned
from .state import EvalState


def identity_metric(state: EvalState) -> str:
    """The metric that judges whether a concept was learned: the identity embedding (``dino``:
    a DINO model, or the micro world's identity model) when the run has one, else CLIP-I."""
    return "dino" if "dino" in state.matrices else "clip_i"


def _nanmean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else math.nan


def results_from_state(state: EvalState) -> dict[str, Any]:
    """Everything a report or a sweep table needs, from one run's state."""
    R = state.matrices
    T = last_stage(R["clip_i"])
    names = state.concepts
    n_samples = state.settings.get("n_samples")
    out: dict[str, Any] = {
        "clip_model": state.clip_model,
        "dino_model": state.dino_model,
        "settings": state.settings,
        "concepts": names,
        "stages_evaluated": T,
        "labels": {
            "mean": f"mean over {n_samples} samples per prompt",
            "best": f"best of {n_samples} samples per prompt (the paper: best of 50)",
        },
        "single": {},
        "forgetting": {},
        "per_concept": {},
        "zero_shot_clip_t": {},
        "gain_over_base": {},
        "multi": {},
    }
    for key, M in R.items():
        s = summarise(M)
        out["single"][key] = s["final"]
        out["forgetting"][key] = s
    for i, name in enumerate(names[:T]):
        pc = {f"{key}_final": float(M[T - 1, i]) for key, M in R.items()}
        pc.update({f"{key}_learned": float(M[i, i]) for key, M in R.items()})
        for key in ("clip_i", "clip_t", "dino"):
            base = state.base.get(key, {}).get(name)
            if base is not None:
                pc[f"{key}_base"] = float(base)
            ref = state.base.get("reference", {}).get(key, {}).get(name)
            if ref is not None:
                pc[f"{key}_reference"] = float(ref)
        out["per_concept"][name] = pc
    # The headline numbers, one definition each (report.md, sweep tables and experiments/ read them here):
    # gain: right after its own stage minus the base model's class-prompt samples, mean over concepts;
    # concept-1 drop: concept 1 right after its stage minus after the last stage;
    # zero-shot drift: zero-shot CLIP-T of the final model minus the base model's.
    for key in ("clip_i", "clip_t", "dino"):
        gains = [pc[f"{key}_learned"] - pc[f"{key}_base"] for pc in out["per_concept"].values() if f"{key}_base" in pc]
        if key in R:
            out["gain_over_base"][key] = _nanmean(gains)
            out.setdefault("concept1_drop", {})[key] = float(R[key][0, 0] - R[key][T - 1, 0]) if T else math.nan
    key = identity_metric(state)
    verdicts = {}
    for name, pc in out["per_concept"].items():
        if f"{key}_base" in pc and f"{key}_reference" in pc:
            pc["learned"] = learned(pc[f"{key}_learned"], pc[f"{key}_base"], pc[f"{key}_reference"])
            pc["kept"] = learned(pc[f"{key}_final"], pc[f"{key}_base"], pc[f"{key}_reference"])
            verdicts[name] = pc
    out["learned"] = {
        "metric": key,
        "rule": "score right after its stage - base class samples >= 0.5 x (references' self-similarity - base)",
        "learned": sum(pc["learned"] for pc in verdicts.values()),
        "kept": sum(pc["kept"] for pc in verdicts.values()),
        "of": len(verdicts),
    }
    for which in ("mean", "best"):
        zs = state.zero_shot.get(which, [])
        out["zero_shot_clip_t"][which] = {
            "base": zs[0] if zs else math.nan,
            "final": zs[T] if len(zs) > T else math.nan,
            "per_stage": zs,
        }
        out["zero_shot_clip_t"][which]["drift"] = out["zero_shot_clip_t"][which]["final"] - out["zero_shot_clip_t"][which]["base"]
    if state.multi:
        out["multi"] = {k: v for k, v in state.multi.items() if k != "pairs"}
        out["multi"]["n_pairs"] = len(state.multi.get("pairs", []))
    return out
