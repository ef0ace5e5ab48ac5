"""Training losses of CNS: diffusion loss, prior preservation (Eq. 8) and L_reg (Eq. 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masking import union_masks


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The denoising loss E||eps - eps_theta(x_t, t, c)||^2 (mean squared error, fp32)."""
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def prior_preservation_loss(
    concept_pred: torch.Tensor,
    concept_target: torch.Tensor,
    prior_pred: torch.Tensor,
    prior_target: torch.Tensor,
    prior_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 8: L = ||eps - eps_theta(x_t, c)||^2 + lambda ||eps' - eps_theta(x'_t, c_class)||^2.

    Returns (total, concept term, prior term) so both terms can be logged.
    """
    concept = diffusion_loss(concept_pred, concept_target)
    prior = diffusion_loss(prior_pred, prior_target)
    return concept + prior_weight * prior, concept, prior


def masked_distance(
    current: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
) -> torch.Tensor:
    """||W (.) M - W_ref (.) M||_2 over all K/V layers together (one vector norm).

    Written with ``torch.linalg.vector_norm``, whose subgradient at 0 is 0: at the start of a stage
    W_m equals W_{m-1} exactly, where a hand-written sqrt(sum(x^2)) would give NaN gradients.
    """
    per_layer = [
        torch.linalg.vector_norm((current[n].float() - reference[n].float()) * masks[n]) for n in masks
    ]
    if not per_layer:
        return next(iter(current.values())).new_zeros(())
    return torch.linalg.vector_norm(torch.stack(per_layer))


def regularization_loss(
    current: dict[str, torch.Tensor],
    previous: dict[str, torch.Tensor],
    initial: dict[str, torch.Tensor],
    overlap: dict[str, torch.Tensor],
    lambda1: float,
    lambda2: float,
) -> torch.Tensor:
    """Eq. 7: L_reg = l1 ||W_m (.) M - W_{m-1} (.) M||_2 + l2 ||W_m (.) M - W_0 (.) M||_2.

    ``overlap`` is M = mask_m AND (OR of the earlier concepts' masks), per layer.
    """
    zero = next(iter(current.values())).new_zeros((), dtype=torch.float32)
    loss = zero
    if lambda1:
        loss = loss + lambda1 * masked_distance(current, previous, overlap)
    if lambda2:
        loss = loss + lambda2 * masked_distance(current, initial, overlap)
    return loss


def overlap_masks(
    current: dict[str, torch.Tensor], earlier: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """M of Eq. 7: mask_m AND (OR of the earlier masks), per layer (empty dict if no earlier masks)."""
    if not earlier:
        return {}
    union = union_masks(earlier)
    out = {}
    for name, m in current.items():
        both = m & union[name]
        if both.any():
            out[name] = both
    return out
