"""The compact K/V stage format of the masked methods (CNS, random neurons, full K/V).

A stage folder holds, for the model after stage NN:

* ``kv.safetensors``: the K/V weights at every entry any concept so far may have changed (the OR of
  masks 1..NN), flattened per layer; all other entries equal the base model's. fp16 deltas W - W_0
  (metadata ``format=delta-fp16``; a layer whose deltas overflow fp16 keeps fp32 deltas), and the
  live weights are rounded to W_0 + delta so that the model in memory is exactly the saved one (a
  resumed run continues bit-identically). Folders may also hold fp32 values (``values-fp32``);
* ``masks.safetensors``: this concept's mask per layer, as zlib-compressed gaps between set entries
  (metadata ``format=gaps-zlib``, shapes per layer; bit-packed masks of older folders still load);
* ``token.safetensors``: this concept's token embedding row (written by the method).

Only masks are kept per concept: no per-concept weights (one model holds every concept).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from ..checkpoint import CheckpointError
from ..masking import union_masks

KV_FILE, MASKS_FILE = "kv.safetensors", "masks.safetensors"


def encode_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as zlib-compressed gaps between its set entries (uint32, bytes split by
    significance): a flat uint8 tensor. Lossless; the shape is kept in the file's metadata."""
    flat = mask.detach().reshape(-1).cpu().numpy()
    idx = np.flatnonzero(flat).astype(np.int64)
    gaps = np.diff(idx, prepend=-1).astype("<u4")
    planes = gaps.view(np.uint8).reshape(-1, 4).T.copy()  # low bytes together, then the next ...
    return torch.frombuffer(bytearray(zlib.compress(planes.tobytes(), 9)), dtype=torch.uint8)


def decode_mask(data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`encode_mask`."""
    planes = np.frombuffer(zlib.decompress(data.numpy().tobytes()), dtype=np.uint8).reshape(4, -1)
    gaps = planes.T.copy().view("<u4").reshape(-1).astype(np.int64)
    count = int(np.prod(shape))
    idx = np.cumsum(gaps) - 1
    if idx.size and (idx[-1] >= count or idx[0] < 0):
        raise CheckpointError(f"mask data points past its shape {shape}")
    out = np.zeros(count, dtype=bool)
    out[idx] = True
    return torch.from_numpy(out).reshape(shape)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A bit-packed mask (8 entries per byte, row-major, MSB first) of folders before ``gaps-zlib``."""
    count = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (count + 7) // 8:
        raise CheckpointError(f"packed mask of dtype {packed.dtype} and shape {tuple(packed.shape)} cannot hold a mask of shape {shape}")
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count).astype(bool)).reshape(shape)


def mask_file(masks: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of ``masks.safetensors``."""
    shapes = {n: "x".join(str(s) for s in m.shape) for n, m in masks.items()}
    return {n: encode_mask(m) for n, m in masks.items()}, {**shapes, "format": "gaps-zlib"}


def read_masks(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """The masks of a ``masks.safetensors`` (gaps-zlib, or bit-packed in older folders)."""
    shape = {n: tuple(int(s) for s in metadata[n].split("x")) for n in tensors}
    if metadata.get("format") == "gaps-zlib":
        return {n: decode_mask(d, shape[n]) for n, d in tensors.items()}
    return {n: unpack_bits(p, shape[n]) for n, p in tensors.items()}


@torch.no_grad()
def round_to_deltas(kv: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], union: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp16 deltas W - W_0 at the union; writes W_0 + delta back into ``kv`` (exactly what
    :func:`apply_kv` will rebuild). A layer whose deltas overflow fp16 keeps fp32 deltas."""
    out = {}
    for n, p in kv.items():
        u = union[n].to(p.device)
        base = initial[n].to(p.device, torch.float32)[u]
        delta = p.detach().float()[u] - base
        d16 = delta.half()
        d = d16 if bool(torch.isfinite(d16).all()) else delta
        p.data[u] = (base + d.float()).to(p.dtype)
        out[n] = d.cpu()
    return out


def kv_file(kv: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], all_masks: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of ``kv.safetensors`` after the concepts of ``all_masks``; rounds ``kv``."""
    return round_to_deltas(kv, initial, union_masks(all_masks)), {"format": "delta-fp16"}


@torch.no_grad()
def apply_kv(kv: dict[str, torch.nn.Parameter], initial: dict[str, torch.Tensor], all_masks: list[dict[str, torch.Tensor]],
             values: dict[str, torch.Tensor], deltas: bool) -> None:
    """Write a stage's saved K/V into the model (entries outside the union = base model).

    ``values``: W - W_0 at the union (``deltas``, a ``delta-fp16`` file) or fp32 values there.
    """
    union = union_masks(all_masks)
    for n, p in kv.items():
        w = initial[n].detach().clone().to(p.device, torch.float32)
        u = union[n].to(p.device)
        w[u] = (w[u] + values[n].to(p.device).float()) if deltas else values[n].to(p.device)
        p.data.copy_(w.to(p.dtype))
