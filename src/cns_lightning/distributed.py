"""Data-parallel training that communicates only the trainable entries.

Two Lightning strategies, both built on Lightning's ``DDPStrategy`` (process launch, ranks,
samplers, barriers, rank-0 saving):

- ``CompactGradStrategy`` (``trainer=ddp_compact``): no ``DistributedDataParallel`` wrapper at
  all. After each backward, ``MaskedAdam``'s compact gradients (exactly the entries it will read,
  a few MB) are averaged over the ranks in one all-reduce (``average_gradients``), so the
  training step is the one-GPU step plus one small collective; the compiled, CUDA-graphed step
  is untouched by DDP's autograd hooks and buckets.
- ``MaskedDDPStrategy`` (``trainer=ddp_masked``): DDP with a communication hook, described below.

A CNS stage trains a few percent of the cross-attention K/V entries and one token row, but
autograd produces dense gradients for every K/V weight and the whole 49k-row token-embedding
matrix (about 230 MB in fp32 at SD-1.5 scale). Plain DDP all-reduces all of it every step.
``MaskedDDPStrategy`` is Lightning's ``DDPStrategy`` with a DDP communication hook
(``masked_allreduce_hook``) that, for each gradient bucket, gathers the entries that
``MaskedAdam`` will read (its masks' flat indices), all-reduces only those (averaged over the
ranks), and writes them back into the bucket. Every other gradient entry stays local: no optimizer
reads it (``MaskedAdam`` updates only masked entries), so every rank still applies the same update
and ends the stage with identical weights. Measured in docs/scaling.md.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects.
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from lightning.pytorch.overrides.distributed import _sync_module_states

from .masking import MaskedAdam


def average_gradients(optimizer: torch.optim.Optimizer, group=None) -> None:
    """Replace the gradient of every parameter ``optimizer`` updates by its mean over the ranks, in
    one all-reduce per dtype. For a ``MaskedAdam`` these are its compact vectors (gathered first if
    nobody did), i.e. only the masked entries. A missing gradient counts as zeros, so every rank
    makes the same collective calls whatever its batch did."""
    if isinstance(optimizer, MaskedAdam) and not optimizer.gathered:
        optimizer.gather_grads()
    world = dist.get_world_size(group)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for dtype in sorted({p.dtype for p in params}, key=str):
        same = [p for p in params if p.dtype == dtype]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in same])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for p in same:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()


def throttle_sigterm_broadcast(trainer, every_n_steps: int) -> None:
    """Lightning 2.6 broadcasts a SIGTERM flag from rank 0 and reads it on the host (``.item()``)
    before every training batch: two host-GPU syncs per step that drain the GPU queue. Make the
    fit loop do it only every ``every_n_steps`` batches (the same batches on every rank, so the
    collective still matches); a SIGTERM is then noticed at most that many steps later."""
    loop = trainer.fit_loop.epoch_loop
    original = getattr(type(loop), "_broadcast_sigterm_tensor", None)
    if original is None or every_n_steps <= 1:
        return

    def every_n() -> None:
        if loop.batch_progress.total.ready % every_n_steps == 0:  # batches run before this one
            original(loop)

    loop._broadcast_sigterm_tensor = every_n


class CompactGradStrategy(DDPStrategy):
    """Lightning's DDP strategy without the ``DistributedDataParallel`` wrapper (see the module
    docstring): every rank starts from rank 0's parameters and buffers (as DDP does), and the
    optimizer step averages the optimizer's gradients over the ranks (``average_gradients``)
    between the backward and the update, before gradient clipping sees them. Every rank then
    applies the same update and keeps identical weights."""

    def __init__(self, sigterm_check_every_n_steps: int = 50, **kwargs):
        n = sigterm_check_every_n_steps
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not float(n).is_integer() or n < 1:
            raise ValueError(f"trainer.strategy.sigterm_check_every_n_steps must be an integer >= 1 "
                             f"(1: Lightning's check before every batch; default 50), got {n!r}")
        super().__init__(**kwargs)
        self.sigterm_check_every_n_steps = int(n)

    def configure_ddp(self) -> None:
        _sync_module_states(self.model)  # what DistributedDataParallel's constructor does
        throttle_sigterm_broadcast(self.lightning_module.trainer, self.sigterm_check_every_n_steps)

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        def closure_then_average():
            result = closure()
            average_gradients(optimizer)
            return result

        return super().optimizer_step(optimizer, closure_then_average, model, **kwargs)


class MaskedGradState:
    """What the hook needs: the strategy (to find the optimizer once it exists) and a per-optimizer
    map from each trainable parameter to its masked flat indices."""

    def __init__(self, strategy: DDPStrategy):
        self.strategy = strategy
        self._for: int | None = None
        self._indices: dict[int, torch.Tensor] = {}

    def indices(self) -> dict[int, torch.Tensor] | None:
        """``id(param) -> flat indices`` of the current ``MaskedAdam``, or None if the optimizer is
        not a ``MaskedAdam`` (then the hook falls back to a dense all-reduce)."""
        opts = [getattr(o, "optimizer", o) for o in self.strategy.optimizers]
        masked = [o for o in opts if isinstance(o, MaskedAdam)]
        if len(masked) != len(opts) or not masked:
            return None
        if self._for != id(masked[0]):
            self._indices = {id(param): idx for opt in masked for param, idx in opt.masked_indices()}
            self._for = id(masked[0])
        return self._indices


def masked_allreduce_hook(state: MaskedGradState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average over the ranks only the gradient entries the masked
    optimizer reads (see the module docstring); a dense average when there is no ``MaskedAdam``."""
    group = dist.group.WORLD
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    indices = state.indices()
    if indices is None:  # not a masked optimizer: DDP's own behaviour (average everything)
        fut = dist.all_reduce(buffer.div_(world), group=group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    where, parts = [], []
    for param, grad in zip(bucket.parameters(), bucket.gradients()):
        idx = indices.get(id(param))
        if idx is not None and idx.numel():
            flat = grad.view(-1)
            where.append((flat, idx))
            parts.append(flat.index_select(0, idx))
    if not parts:  # nothing trainable in this bucket
        done = torch.futures.Future()
        done.set_result(buffer)
        return done
    compact = (torch.cat(parts) if len(parts) > 1 else parts[0]).div_(world)
    fut = dist.all_reduce(compact, group=group, async_op=True).get_future()

    def scatter(f: torch.futures.Future) -> torch.Tensor:
        reduced, offset = f.value()[0], 0
        for flat, idx in where:
            flat.index_copy_(0, idx, reduced[offset : offset + idx.numel()])
            offset += idx.numel()
        return buffer

    return fut.then(scatter)


class MaskedDDPStrategy(DDPStrategy):
    """Lightning DDP whose gradient all-reduce carries only the masked entries
    (``masked_allreduce_hook``); registered on every backend (Lightning registers DDP comm hooks
    on CUDA only), so the CPU tests run the same code as the GPUs."""

    def __init__(self, **kwargs):
        for key in ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper"):
            if kwargs.get(key) is not None:
                raise ValueError(f"MaskedDDPStrategy sets its own communication hook: drop trainer.strategy.{key}")
        super().__init__(**kwargs)

    def _register_ddp_hooks(self) -> None:
        self.model.register_comm_hook(MaskedGradState(self), masked_allreduce_hook)


def is_main_rank() -> bool:
    """True outside torch.distributed and on rank 0 (the only rank that writes or evaluates)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) under an initialised torch.distributed group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def ranks_agree(tensors: list) -> tuple:
    """(world size, sha256 of ``tensors``) after checking that every torch.distributed rank holds
    the same values (DDP must leave identical weights on every rank); raises ``RuntimeError`` naming
    the ranks' digests if not. Outside torch.distributed: (1, "") and nothing is hashed."""
    from .checkpoint import hash_tensors

    if not (dist.is_available() and dist.is_initialized()):
        return 1, ""
    digest = hash_tensors(tensors).hexdigest()[:16]
    digests: list = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"the ranks' trained weights differ after DDP (sha256 per rank: {digests}); nothing of this stage was saved")
    return len(digests), digest


def setup_distributed(device: torch.device) -> torch.device:
    """Under torchrun (trainer=ddp): one GPU per rank, and the process group made early so prior
    generation can be split over ranks (Lightning reuses the group)."""
    import os

    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def teardown_distributed() -> None:
    """After a completed run: wait for every rank, then close the process group (left open, its
    threads can abort the interpreter at exit: "terminate called without an active exception"),
    so a next Hydra job in this process starts a fresh one."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
