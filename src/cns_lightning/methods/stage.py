"""The training state of one stage, driven by the LightningModule (``module.ContinualModule``).

``TrainingStage`` is what a method's ``begin_stage`` returns and all the module asks of it: the
optimizer, an extra loss term, a hook after each backward, and ``end``. ``MaskedStage`` is the one
every method here uses: only the masked entries of some parameters train (``MaskedAdam``, bit-exact:
nothing outside the masks is written), optionally with L_reg (Eq. 7) on the entries of M.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..losses import overlap_masks, regularization_loss
from ..masking import MaskedAdam, flat_indices, row_mask


class TrainingStage(Protocol):
    key: str  # names the stage in messages
    token_ids: list[int]  # token rows that train (the prior prompt's embedding is cached unless it holds one)
    # Optional: ``text_states(text_encoder, input_ids) -> (n, S, d)``, the UNet's text states of a
    # batch (layer-wise tokens); without it the module uses ``text_encoder(input_ids)[0]``.

    def trainable(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, mask broadcastable to it) of everything the stage may change."""
        ...

    def configure_optimizer(self) -> torch.optim.Optimizer: ...

    def extra_loss(self, device: torch.device) -> torch.Tensor | None: ...

    def after_backward(self, micro_batches: int) -> None: ...

    def end(self) -> None: ...


@dataclass
class Regularizer:
    """L_reg (Eq. 7) of a stage: the flat indices of M per layer, and W_{m-1}, W_0 there."""

    overlap: dict[str, torch.Tensor]  # M per trained layer
    index: dict[str, torch.Tensor]  # flat indices of M
    previous: dict[str, torch.Tensor]  # W_{m-1} at M (the weights at the start of the stage)
    initial: dict[str, torch.Tensor]  # W_0 at M
    lambda1: float
    lambda2: float
    pos: torch.Tensor | None = None  # positions of M in the optimizer's compact vector
    previous_c: torch.Tensor | None = None  # ``previous`` / ``initial`` in that order, fp32
    initial_c: torch.Tensor | None = None
    grad: torch.Tensor | None = None  # L_reg's gradient there, added after the backward


@dataclass
class MaskedStage:
    """Stage ``key``: the masked entries of ``kv`` (layer -> (param, mask)) with lr ``lr_kv`` and the
    rows ``token_ids`` of ``embeddings`` with lr ``lr_token``; ``reg`` is L_reg or None."""

    key: str
    token_ids: list[int]
    kv: dict[str, tuple[torch.nn.Parameter, torch.Tensor]]
    embeddings: torch.nn.Parameter
    lr_kv: float
    lr_token: float
    reg: Regularizer | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    optimizer: MaskedAdam | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        for p, _ in self.kv.values():
            p.requires_grad_(True)
        self.embeddings.requires_grad_(True)
        self.token_mask = row_mask(self.embeddings.shape[0], self.token_ids, self.embeddings.device)

    def trainable(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [*self.kv.values(), (self.embeddings, self.token_mask)]

    def configure_optimizer(self) -> MaskedAdam:
        groups = []
        if self.kv:
            groups.append({"params": list(self.kv.values()), "lr": self.lr_kv, "name": "neurons"})
        groups.append({"params": [(self.embeddings, self.token_mask)], "lr": self.lr_token, "name": "token"})
        # Adam over the masked entries only (no weight decay: nothing outside the masks may move).
        self.optimizer = opt = MaskedAdam(groups, betas=self.betas, eps=self.eps)
        if self.reg is not None:
            # Eq. 7 needs only the entries of M: a subset of the compact vector of the "neurons" group.
            names = list(self.reg.index)
            self.reg.pos = torch.cat([opt.positions(0, self.kv[n][0], self.reg.overlap[n]) for n in names])
            self.reg.previous_c = torch.cat([self.reg.previous[n].float() for n in names])
            self.reg.initial_c = torch.cat([self.reg.initial[n].float() for n in names])
            self.reg.grad = None
        return opt

    def extra_loss(self, device: torch.device) -> torch.Tensor | None:
        """L_reg (Eq. 7) on the entries of M, read from the optimizer's compact vector (the same
        values as the weights there). Its gradient is computed here, on that short vector, and added
        to the compact gradient in ``after_backward``: a handful of kernels instead of a gather,
        two norms and a scatter per layer."""
        reg = self.reg
        if reg is None:
            return None
        if self.optimizer is None:  # no optimizer yet (a training step called by hand): per-layer form
            current = {n: self.kv[n][0].view(-1)[i] for n, i in reg.index.items()}
            every = {n: torch.ones((), dtype=torch.bool, device=device) for n in current}
            return regularization_loss(current, reg.previous, reg.initial, every, reg.lambda1, reg.lambda2)
        compact = self.optimizer.param_groups[0]["params"][0]
        with torch.enable_grad():
            c = compact.detach()[reg.pos].requires_grad_(True)
            one = {"M": torch.ones((), dtype=torch.bool, device=device)}
            loss = regularization_loss({"M": c}, {"M": reg.previous_c}, {"M": reg.initial_c}, one, reg.lambda1, reg.lambda2)
            reg.grad = torch.autograd.grad(loss, c)[0] if loss.requires_grad else None
        return loss.detach()

    def after_backward(self, micro_batches: int = 1) -> None:
        opt = self.optimizer
        if opt is None:
            return
        opt.gather_grads()  # gradient clipping / grad-norm callbacks then see the compact grads
        if self.reg is not None and self.reg.grad is not None:
            # Lightning divides each micro-batch's loss by accumulate_grad_batches: so does L_reg's
            # gradient, which then enters an optimizer step once whatever the accumulation.
            opt.param_groups[0]["params"][0].grad.index_add_(0, self.reg.pos, self.reg.grad, alpha=1.0 / micro_batches)
            self.reg.grad = None

    def end(self) -> None:
        for p, _ in self.kv.values():
            p.requires_grad_(False)
        self.embeddings.requires_grad_(False)


@torch.no_grad()
def regularizer(
    kv: dict[str, tuple[torch.nn.Parameter, torch.Tensor]],
    earlier: list[dict[str, torch.Tensor]],
    initial: dict[str, torch.Tensor],
    lambda1: float,
    lambda2: float,
) -> Regularizer | None:
    """L_reg of a stage training ``kv`` after the concepts of ``earlier`` masks (None if M is empty
    everywhere, as in stage 1). W_{m-1} is the weights now, at the start of stage m."""
    masks = {n: m for n, (_, m) in kv.items()}
    overlap = {n: m for n, m in overlap_masks(masks, earlier).items() if n in kv}
    if not overlap:
        return None
    index = {n: flat_indices(m, m.shape) for n, m in overlap.items()}
    return Regularizer(
        overlap=overlap, index=index,
        previous={n: kv[n][0].detach().view(-1)[i] for n, i in index.items()},
        initial={n: initial[n].view(-1)[i] for n, i in index.items()},
        lambda1=float(lambda1), lambda2=float(lambda2),
    )


def masked_stage(key: str, unet, embeddings: torch.nn.Parameter, token_ids: list[int], masks: dict[str, torch.Tensor],
                 earlier: list[dict[str, torch.Tensor]], initial: dict[str, torch.Tensor], lr_kv: float, lr_token: float,
                 lambda1: float = 0.0, lambda2: float = 0.0) -> MaskedStage:
    """A stage training the entries of ``masks`` (per K/V layer of ``unet``; layers with an empty
    mask stay frozen) and the rows ``token_ids``, with L_reg against ``earlier`` masks and W_0
    ``initial`` (CNS and its ablations; scripts and tests build stages with it too)."""
    from ..models import cross_attention_kv

    trainable = {n: (p, masks[n]) for n, p in cross_attention_kv(unet).items() if bool(masks[n].any())}
    return MaskedStage(key=key, token_ids=list(token_ids), kv=trainable, embeddings=embeddings, lr_kv=lr_kv, lr_token=lr_token,
                       reg=regularizer(trainable, earlier, initial, lambda1, lambda2))
