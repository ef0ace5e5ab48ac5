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
from .state import EvalState


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
        for key in ("clip_i", "clip_t"):
            base = state.base.get(key, {}).get(name)
            if base is not None:
                pc[f"{key}_base"] = float(base)
        out["per_concept"][name] = pc
    for key in ("clip_i", "clip_t"):
        gains = [pc[f"{key}_final"] - pc[f"{key}_base"] for pc in out["per_concept"].values() if f"{key}_base" in pc]
        out["gain_over_base"][key] = _nanmean(gains)
    for which in ("mean", "best"):
        zs = state.zero_shot.get(which, [])
        out["zero_shot_clip_t"][which] = {
            "base": zs[0] if zs else math.nan,
            "final": zs[T] if len(zs) > T else math.nan,
            "per_stage": zs,
        }
    if state.multi:
        out["multi"] = {k: v for k, v in state.multi.items() if k != "pairs"}
        out["multi"]["n_pairs"] = len(state.multi.get("pairs", []))
    return out
