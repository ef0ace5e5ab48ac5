"""Forgetting matrices R[t, i]: the score of concept i measured after learning stage t.

Rows are stages (t = 1..T, stored 0-based), columns concepts (i = 1..T); R[t, i] is NaN for
i > t (concept i not learned yet). The summaries use the last filled row as "final", so a run that
was interrupted still reports what it has.
"""

from __future__ import annotations

import math

import numpy as np


def new_matrix(n: int) -> np.ndarray:
    """An n x n matrix of NaN."""
    return np.full((n, n), np.nan, dtype=np.float64)


def last_stage(R: np.ndarray) -> int:
    """Number of filled rows (stages evaluated so far): rows are filled in order."""
    filled = [t for t in range(R.shape[0]) if not np.all(np.isnan(R[t]))]
    return (max(filled) + 1) if filled else 0


def final_mean(R: np.ndarray) -> float:
    """Mean over learned concepts of the last filled row: the score of the final model."""
    t = last_stage(R)
    return float(np.nanmean(R[t - 1, :t])) if t else math.nan


def diagonal_mean(R: np.ndarray) -> float:
    """Mean of R[i, i]: each concept right after it was learned (no forgetting yet)."""
    t = last_stage(R)
    return float(np.nanmean(np.diag(R)[:t])) if t else math.nan


def average_score(R: np.ndarray) -> float:
    """Mean over all filled entries (lower triangle): the area under the forgetting curves."""
    vals = R[~np.isnan(R)]
    return float(vals.mean()) if vals.size else math.nan


def forgetting(R: np.ndarray) -> float:
    """Average forgetting (Chaudhry et al. 2018): mean_i<T [max_{i<=t<T} R[t,i] - R[T,i]]."""
    t = last_stage(R)
    if t < 2:
        return math.nan
    drops = [np.nanmax(R[i : t - 1, i]) - R[t - 1, i] for i in range(t - 1)]
    return float(np.mean(drops))


def backward_transfer(R: np.ndarray) -> float:
    """Backward transfer (Lopez-Paz & Ranzato 2017): mean_i<T [R[T,i] - R[i,i]] (negative = forgetting)."""
    t = last_stage(R)
    if t < 2:
        return math.nan
    return float(np.mean([R[t - 1, i] - R[i, i] for i in range(t - 1)]))


def summarise(R: np.ndarray) -> dict[str, float]:
    """All summaries of one matrix, by name."""
    return {
        "final": final_mean(R),
        "diagonal": diagonal_mean(R),
        "average": average_score(R),
        "forgetting": forgetting(R),
        "bwt": backward_transfer(R),
    }


def to_json(R: np.ndarray) -> list[list[float | None]]:
    """Matrix -> nested lists with None for NaN (strict JSON has no NaN)."""
    return [[None if math.isnan(v) else float(v) for v in row] for row in R.tolist()]


def from_json(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[math.nan if v is None else float(v) for v in row] for row in rows], dtype=np.float64).reshape(
        len(rows), len(rows[0]) if rows else 0
    )
