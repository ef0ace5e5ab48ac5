"""Eq. 7 and Eq. 8 against direct computations; finite L_reg gradients at a stage's start."""

import math

import pytest
import torch

from cns_lightning.losses import masked_distance, overlap_masks, prior_preservation_loss, regularization_loss


def test_eq8_prior_preservation():
    torch.manual_seed(0)
    a, b, c, d = (torch.randn(2, 4, 4, 4) for _ in range(4))
    total, concept, prior = prior_preservation_loss(a, b, c, d, prior_weight=0.7)
    direct_concept = ((a - b) ** 2).mean()
    direct_prior = ((c - d) ** 2).mean()
    assert concept.item() == pytest.approx(direct_concept.item(), rel=1e-6)
    assert total.item() == pytest.approx((direct_concept + 0.7 * direct_prior).item(), rel=1e-6)


def test_eq7_matches_direct_formula():
    torch.manual_seed(0)
    names = ["k", "v"]
    cur = {n: torch.randn(3, 4) for n in names}
    prev = {n: torch.randn(3, 4) for n in names}
    init = {n: torch.randn(3, 4) for n in names}
    m = {n: torch.rand(3, 4) > 0.5 for n in names}
    got = regularization_loss(cur, prev, init, m, lambda1=0.3, lambda2=2.0)
    d1 = math.sqrt(sum(float(((cur[n] * m[n] - prev[n] * m[n]) ** 2).sum()) for n in names))
    d2 = math.sqrt(sum(float(((cur[n] * m[n] - init[n] * m[n]) ** 2).sum()) for n in names))
    assert got.item() == pytest.approx(0.3 * d1 + 2.0 * d2, rel=1e-5)


def test_overlap_is_mask_and_union_of_earlier():
    cur = {"k": torch.tensor([[True, True, False, False]])}
    e1 = {"k": torch.tensor([[True, False, False, False]])}
    e2 = {"k": torch.tensor([[False, False, True, False]])}
    assert overlap_masks(cur, [e1, e2])["k"].tolist() == [[True, False, False, False]]
    assert overlap_masks(cur, []) == {}


def test_reg_gradient_finite_at_stage_start():
    """At the start of stage m, W_m == W_{m-1}: vector_norm's subgradient there is 0, not NaN."""
    w = torch.randn(3, 4)
    cur = {"k": w.clone().requires_grad_(True)}
    prev = {"k": w.clone()}
    init = {"k": w.clone() + 0.5}
    m = {"k": torch.ones(3, 4, dtype=torch.bool)}
    loss = regularization_loss(cur, prev, init, m, 1.0, 1.0)
    loss.backward()
    assert torch.isfinite(cur["k"].grad).all()
    # the naive sqrt(sum(x^2)) is NaN there: the reason for vector_norm
    naive = {"k": w.clone().requires_grad_(True)}
    torch.sqrt((((naive["k"] - prev["k"]) * m["k"]) ** 2).sum()).backward()
    assert torch.isnan(naive["k"].grad).all()


def test_masked_distance_ignores_unmasked_entries():
    cur = {"k": torch.tensor([[1.0, 100.0]])}
    ref = {"k": torch.tensor([[0.0, -100.0]])}
    assert masked_distance(cur, ref, {"k": torch.tensor([[True, False]])}).item() == pytest.approx(1.0)
