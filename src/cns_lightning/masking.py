"""Masked updates: only the selected entries of a parameter may change during a stage.

``MaskedAdam``: Adam over a compact copy of only the masked entries. Each step gathers the
gradient at the mask's flat indices, runs one fused (CUDA) or foreach/single-tensor (CPU) Adam
update over the compact vector, and writes the new values back with ``index_copy_`` at those
indices. Entries outside the mask are never written (bit-exact), and the optimizer's state is the
size of the masks, not of the weights.
"""

from __future__ import annotations


import torch


def row_mask(num_rows: int, rows: list[int], device=None) -> torch.Tensor:
    """A (num_rows, 1) bool mask selecting ``rows`` of an embedding matrix."""
    m = torch.zeros(num_rows, 1, dtype=torch.bool, device=device)
    m[rows] = True
    return m


def union_masks(masks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per layer, the OR of several sets of masks (new tensors; ``masks`` must not be empty)."""
    out = {n: m.clone() for n, m in masks[0].items()}
    for d in masks[1:]:
        for n in out:
            out[n] |= d[n]
    return out


def flat_indices(mask: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Flat (row-major) int64 indices of the True entries of ``mask`` broadcast to ``shape``."""
    return mask.expand(shape).reshape(-1).nonzero().squeeze(1)


class MaskedAdam(torch.optim.Adam):
    """Adam over only the masked entries of some parameters (see the module docstring).

    ``groups``: ``[{"params": [(param, mask), ...], "lr": ..., "name": ...}, ...]``, masks bool and
    broadcastable to their parameter. The optimizer's own parameters are one compact fp32 vector
    per group (the masked entries, concatenated); ``step`` gathers the gradient into it, runs
    ``torch.optim.Adam`` on it (``fused`` on CUDA) and scatters the result back. Gradient
    clipping and ``on_before_optimizer_step`` see the compact gradients once ``gather_grads`` has
    run (the module calls it from ``on_after_backward``); ``step`` calls it if nobody did.
    """

    def __init__(self, groups: list[dict], betas=(0.9, 0.999), eps: float = 1e-8, fused: bool | None = None):
        sources, compact_groups = [], []
        device = None
        for g in groups:
            entries, values, offset = [], [], 0
            for param, mask in g["params"]:
                idx = flat_indices(mask.to(param.device), param.shape)
                entries.append((param, idx, offset, idx.numel()))
                values.append(param.detach().reshape(-1).index_select(0, idx).float())
                offset += idx.numel()
                device = param.device
            if not entries:
                continue
            compact = torch.cat(values) if len(values) > 1 else values[0].clone()
            sources.append(entries)
            compact_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [compact]})
        if not compact_groups:
            raise ValueError("MaskedAdam: no parameter entries to train (every mask is empty)")
        if fused is None:
            fused = device is not None and device.type == "cuda"
        super().__init__(compact_groups, betas=tuple(betas), eps=eps, weight_decay=0.0, fused=fused or None)
        self._sources = sources
        self._gathered = False

    def positions(self, group: int, param: torch.Tensor, sub_mask: torch.Tensor) -> torch.Tensor:
        """Where the entries of ``sub_mask`` (a subset of ``param``'s mask) sit in group ``group``'s
        compact vector: int64 indices, in the row-major order of ``param``."""
        for p, idx, offset, _ in self._sources[group]:
            if p is param:
                sub = flat_indices(sub_mask.to(idx.device), param.shape)
                pos = torch.searchsorted(idx, sub)
                if pos.numel() and (bool((pos >= idx.numel()).any()) or not torch.equal(idx[pos.clamp_max(idx.numel() - 1)], sub)):
                    raise ValueError("positions(): sub_mask is not a subset of the parameter's mask")
                return pos + offset
        raise KeyError("positions(): parameter not in this group")

    def masked_indices(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(param, flat indices)`` of every trained parameter: the gradient entries ``step`` reads."""
        return [(param, idx) for entries in self._sources for param, idx, _, _ in entries]

    def compact_size(self) -> int:
        return sum(g["params"][0].numel() for g in self.param_groups)

    @property
    def gathered(self) -> bool:
        """Whether the compact gradients already hold the last backward's gradients."""
        return self._gathered

    @torch.no_grad()
    def gather_grads(self) -> None:
        """Add each source parameter's gradient at its masked entries to the compact gradients
        (which accumulate, like ``.grad``, until ``zero_grad``), then drop the full-size gradient."""
        for group, entries in zip(self.param_groups, self._sources):
            compact = group["params"][0]
            parts = []
            for param, idx, _, n in entries:
                if param.grad is None:
                    parts.append(compact.new_zeros(n))
                else:
                    parts.append(param.grad.reshape(-1).index_select(0, idx).float())
                    param.grad = None  # the full-size gradient is not needed any more
            fresh = torch.cat(parts) if len(parts) > 1 else parts[0]
            compact.grad = fresh if compact.grad is None else compact.grad.add_(fresh)
        self._gathered = True

    @torch.no_grad()
    def scatter_values(self) -> None:
        """Write the compact values back into the parameters, at the masked entries only."""
        for group, entries in zip(self.param_groups, self._sources):
            compact = group["params"][0]
            for param, idx, offset, n in entries:
                flat = param.data.view(-1)
                flat.index_copy_(0, idx, compact[offset : offset + n].to(flat.dtype))

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._gathered:
            self.gather_grads()
        super().step()
        self.scatter_values()
        self._gathered = False
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for entries in self._sources:
            for param, *_ in entries:
                param.grad = None
        self._gathered = False
