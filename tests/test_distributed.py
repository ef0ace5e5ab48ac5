"""distributed.py: the DDP hook all-reduces exactly the masked gradient entries, and `average_gradients` (CompactGradStrategy) averages exactly the compact gradients (2 gloo processes)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from cns_lightning.distributed import MaskedGradState, average_gradients, masked_allreduce_hook
from cns_lightning.masking import MaskedAdam, row_mask


class Holder:  # what MaskedGradState reads from a Lightning strategy: its optimizers
    def __init__(self):
        self.optimizers = []


def _toy_problem(rank: int, world: int, init: str):
    """Join the gloo group; the same toy model on every rank (a "K/V" weight with a random mask and
    a token-embedding row), its MaskedAdam, and this rank's own input."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 6, bias=False))
    emb, lin = model[0].weight, model[1].weight
    kv_mask = torch.rand(lin.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    opt = MaskedAdam([{"params": [(lin, kv_mask)], "lr": 1e-2}, {"params": [(emb, row_mask(10, [3]))], "lr": 1e-2}])
    x = torch.tensor([[3, 1 + rank]])  # every rank its own data
    return model, emb, lin, kv_mask, opt, x


def _spawn(worker, tmp_path, world: int = 2) -> dict:
    out = mp.Manager().dict()
    mp.spawn(worker, args=(world, f"file://{tmp_path / 'store'}", out), nprocs=world, join=True)
    return dict(out)


def _worker(rank: int, world: int, init: str, out: dict) -> None:
    model, emb, lin, kv_mask, opt, x = _toy_problem(rank, world, init)
    holder = Holder()
    holder.optimizers = [opt]
    ddp = DistributedDataParallel(model, bucket_cap_mb=1)
    ddp.register_comm_hook(MaskedGradState(holder), masked_allreduce_hook)
    ddp(x).pow(2).sum().backward()
    local = model(x).pow(2).sum()  # the same loss without DDP: this rank's own gradient
    g_lin, g_emb = torch.autograd.grad(local, [lin, emb])
    out[rank] = dict(lin=lin.grad.clone(), emb=emb.grad.clone(), local_lin=g_lin, local_emb=g_emb, mask=kv_mask)
    opt.step()
    out[f"w{rank}"] = (lin.detach().clone(), emb.detach().clone())
    dist.destroy_process_group()


def test_only_masked_entries_are_averaged_and_weights_stay_identical(tmp_path):
    out = _spawn(_worker, tmp_path)
    r0, r1 = out[0], out[1]
    m = r0["mask"]
    mean_lin = (r0["local_lin"] + r1["local_lin"]) / 2
    for r in (r0, r1):
        assert torch.allclose(r["lin"][m], mean_lin[m])          # masked K/V entries: the ranks' average
        assert torch.equal(r["lin"][~m], r["local_lin"][~m])      # the rest: never communicated
        assert torch.allclose(r["emb"][3], (r0["local_emb"][3] + r1["local_emb"][3]) / 2)  # the token row
        assert torch.equal(r["emb"][[1, 2]], r["local_emb"][[1, 2]])  # other rows: local
    assert not torch.equal(r0["local_lin"][m], r1["local_lin"][m])  # the ranks did differ
    (a_lin, a_emb), (b_lin, b_emb) = out["w0"], out["w1"]
    assert torch.equal(a_lin, b_lin) and torch.equal(a_emb, b_emb)  # one update on every rank


def _compact_worker(rank: int, world: int, init: str, out: dict) -> None:
    model, emb, lin, kv_mask, opt, x = _toy_problem(rank, world, init)
    before = lin.detach().clone()
    model(x).pow(2).sum().backward()
    local = [g.clone() for g in (lin.grad, emb.grad)]
    average_gradients(opt)  # no DDP wrapper: one all-reduce of the compact gradients
    out[rank] = dict(compact=[g["params"][0].grad.clone() for g in opt.param_groups], local=local, mask=kv_mask)
    opt.step()
    out[f"w{rank}"] = (lin.detach().clone(), emb.detach().clone(), before)
    dist.destroy_process_group()


def test_average_gradients_averages_the_compact_gradients_and_weights_stay_identical(tmp_path):
    out = _spawn(_compact_worker, tmp_path)
    r0, r1 = out[0], out[1]
    m = r0["mask"]
    mean_lin = (r0["local"][0] + r1["local"][0]) / 2
    mean_row = (r0["local"][1][3] + r1["local"][1][3]) / 2
    assert not torch.equal(r0["local"][0][m], r1["local"][0][m])  # the ranks did differ
    for r in (r0, r1):
        assert torch.allclose(r["compact"][0], mean_lin[m])  # the masked K/V entries, row-major
        assert torch.allclose(r["compact"][1], mean_row)      # the token row
        assert torch.equal(r["compact"][0], r0["compact"][0]) and torch.equal(r["compact"][1], r0["compact"][1])
    (a_lin, a_emb, before), (b_lin, b_emb, _) = out["w0"], out["w1"]
    assert torch.equal(a_lin, b_lin) and torch.equal(a_emb, b_emb)  # one update on every rank
    assert torch.equal(a_lin[~m], before[~m]) and not torch.equal(a_lin[m], before[m])


def test_throttle_sigterm_broadcast_checks_every_n_batches(monkeypatch):
    """CompactGradStrategy makes Lightning's per-batch SIGTERM broadcast (two host syncs) run every
    n batches: at the same batch counts on every rank, starting with the first."""
    import lightning as L
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    from cns_lightning.distributed import throttle_sigterm_broadcast

    seen = []
    monkeypatch.setattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", lambda self: seen.append(self.batch_progress.total.ready))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    throttle_sigterm_broadcast(trainer, 3)
    loop = trainer.fit_loop.epoch_loop
    for _ in range(7):  # what advance() does: the check, then the batch counts as ready
        loop._broadcast_sigterm_tensor()
        loop.batch_progress.increment_ready()
    assert seen == [0, 3, 6]


@pytest.mark.parametrize("bad", [0, -5, 2.5, "10", True])
def test_compact_strategy_rejects_a_bad_sigterm_interval(bad):
    from cns_lightning.distributed import CompactGradStrategy

    with pytest.raises(ValueError, match="trainer.strategy.sigterm_check_every_n_steps must be an integer >= 1"):
        CompactGradStrategy(sigterm_check_every_n_steps=bad)
    assert CompactGradStrategy(sigterm_check_every_n_steps=1).sigterm_check_every_n_steps == 1
