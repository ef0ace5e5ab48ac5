"""distributed.py: the DDP hook all-reduces exactly the masked gradient entries (2 gloo processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from cns_lightning.distributed import MaskedGradState, masked_allreduce_hook
from cns_lightning.masking import MaskedAdam, row_mask


class Holder:  # what MaskedGradState reads from a Lightning strategy: its optimizers
    def __init__(self):
        self.optimizers = []


def _worker(rank: int, world: int, init: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 6, bias=False))
    emb, lin = model[0].weight, model[1].weight
    kv_mask = torch.rand(lin.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    holder = Holder()
    ddp = DistributedDataParallel(model, bucket_cap_mb=1)
    ddp.register_comm_hook(MaskedGradState(holder), masked_allreduce_hook)
    opt = MaskedAdam([{"params": [(lin, kv_mask)], "lr": 1e-2}, {"params": [(emb, row_mask(10, [3]))], "lr": 1e-2}])
    holder.optimizers = [opt]
    x = torch.tensor([[3, 1 + rank]])  # every rank its own data
    ddp(x).pow(2).sum().backward()
    local = model(x).pow(2).sum()  # the same loss without DDP: this rank's own gradient
    g_lin, g_emb = torch.autograd.grad(local, [lin, emb])
    out[rank] = dict(lin=lin.grad.clone(), emb=emb.grad.clone(), local_lin=g_lin, local_emb=g_emb, mask=kv_mask)
    opt.step()
    out[f"w{rank}"] = (lin.detach().clone(), emb.detach().clone())
    dist.destroy_process_group()


def test_only_masked_entries_are_averaged_and_weights_stay_identical(tmp_path):
    world = 2
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(world, f"file://{tmp_path / 'store'}", out), nprocs=world, join=True)
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
