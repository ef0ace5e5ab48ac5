"""MaskedAdam: Adam restricted to masked entries, bit-exact outside them, equal to dense Adam inside."""

import pytest
import torch

from cns_lightning.masking import MaskedAdam, flat_indices, row_mask


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(12, 7, generator=g))
    e = torch.nn.Parameter(torch.randn(9, 5, generator=g))
    mask = torch.rand(12, 7, generator=g) < 0.3
    rows = row_mask(9, [2, 6])
    target_w, target_e = torch.randn(12, 7, generator=g), torch.randn(9, 5, generator=g)
    return w, e, mask, rows, target_w, target_e


def _loss(w, e, tw, te):
    return ((w - tw) ** 2).sum() + ((e.sin() - te) ** 2).sum()


def test_flat_indices_of_broadcast_row_mask():
    idx = flat_indices(row_mask(4, [1, 3]), (4, 3))
    assert idx.tolist() == [3, 4, 5, 9, 10, 11]


def test_masked_adam_changes_only_masked_entries_and_matches_dense_adam():
    w, e, mask, rows, tw, te = _problem()
    w0, e0 = w.detach().clone(), e.detach().clone()
    opt = MaskedAdam([{"params": [(w, mask)], "lr": 1e-2}, {"params": [(e, rows)], "lr": 5e-2}], betas=(0.9, 0.99), eps=1e-8)
    assert opt.compact_size() == int(mask.sum()) + 2 * 5
    # reference: plain Adam on dense copies with masked gradients (entries outside never move)
    rw, re_ = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(e0.clone())
    ref = torch.optim.Adam([{"params": [rw], "lr": 1e-2}, {"params": [re_], "lr": 5e-2}], betas=(0.9, 0.99), eps=1e-8)
    for _ in range(5):
        opt.zero_grad()
        _loss(w, e, tw, te).backward()
        opt.step()
        ref.zero_grad()
        _loss(rw, re_, tw, te).backward()
        rw.grad *= mask
        re_.grad *= rows
        ref.step()
    assert torch.equal(w.detach()[~mask], w0[~mask]), "an entry outside the mask changed"
    assert torch.equal(e.detach()[~rows.squeeze(1)], e0[~rows.squeeze(1)]), "another row changed"
    assert (w.detach()[mask] != w0[mask]).all()
    torch.testing.assert_close(w.detach()[mask], rw.detach()[mask], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(e.detach()[rows.squeeze(1)], re_.detach()[rows.squeeze(1)], rtol=1e-6, atol=1e-7)
    assert w.grad is None and e.grad is None, "full-size gradients are released after the step"


def test_masked_adam_with_closure_and_gathered_grads_for_clipping():
    w, e, mask, rows, tw, te = _problem(1)
    w0 = w.detach().clone()
    opt = MaskedAdam([{"params": [(w, mask)], "lr": 1e-2}])

    def closure():
        opt.zero_grad()
        loss = _loss(w, e, tw, te)
        loss.backward()
        opt.gather_grads()  # as MaskedStage.after_backward does
        compact = opt.param_groups[0]["params"][0]
        assert compact.grad is not None and compact.grad.numel() == int(mask.sum())
        torch.nn.utils.clip_grad_norm_([compact], 1e-3)
        return loss

    opt.step(closure)
    moved = (w.detach() - w0)[mask]
    assert torch.equal(w.detach()[~mask], w0[~mask])
    assert moved.abs().max() <= 1e-2 * 1.001  # Adam's first step is lr * sign(g)


def test_masked_adam_refuses_empty_masks():
    w = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="every mask is empty"):
        MaskedAdam([{"params": [], "lr": 1e-3}])
    opt = MaskedAdam([{"params": [(w, torch.zeros(3, 3, dtype=torch.bool))], "lr": 1e-3}, {"params": [(w, torch.eye(3, dtype=torch.bool))], "lr": 1e-3}])
    assert opt.compact_size() == 3


def test_masked_adam_compact_gradients_accumulate_until_zero_grad():
    """Gradient accumulation (trainer.accumulate_grad_batches): two backwards gathered one after the
    other give the compact gradient of their sum, as .grad would; zero_grad clears it."""
    w, e, mask, rows, tw, te = _problem(2)
    opt = MaskedAdam([{"params": [(w, mask)], "lr": 1e-2}])
    half = lambda: 0.5 * _loss(w, e, tw, te)  # noqa: E731
    half().backward()
    opt.gather_grads()
    half().backward()
    opt.gather_grads()
    accumulated = opt.param_groups[0]["params"][0].grad.clone()
    opt.zero_grad()
    assert opt.param_groups[0]["params"][0].grad is None
    _loss(w, e, tw, te).backward()
    opt.gather_grads()
    torch.testing.assert_close(accumulated, opt.param_groups[0]["params"][0].grad)
