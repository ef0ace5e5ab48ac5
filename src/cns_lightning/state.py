"""A run's saved state: one folder per completed stage, safetensors and JSON only.

``<run>/stages/NN_<concept>/`` holds, for the model after stage NN:

* ``kv.safetensors``: the K/V weights at every entry any concept so far may have changed (the OR of
  masks 1..NN), flattened per layer; all other entries equal the base model's. With ``initial``
  (W_0) given to ``save_stage``: fp16 deltas W - W_0 (metadata ``format=delta-fp16``), and the live
  weights are rounded to W_0 + delta so that the model in memory is exactly the saved one (a resumed
  run continues bit-identically). Without it: fp32 values (``format=values-fp32``, exact);
* ``masks.safetensors``: this concept's mask per layer, as zlib-compressed gaps between set entries
  (metadata ``format=gaps-zlib``; about 4x smaller than bit-packing at 5% density; older folders with
  bit-packed masks still load);
* ``token.safetensors``: this concept's token embedding row;
* ``selection.json`` (mask statistics) and ``stage.json`` (concept, token, steps, losses, time);
* ``manifest.json``: every file's sha256, written last. A folder without it is an unfinished stage.

Only masks are kept per concept: no per-concept weights (one model holds every concept).
"""

from __future__ import annotations

import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, hash_tensors, load_json, load_tensors, save_json, save_tensors, unpack_mask, verify_folder, write_manifest

def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    return Path(run_dir) / "stages" / f"{index + 1:02d}_{safe_name(name)}"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def union_masks(masks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {n: m.clone() for n, m in masks[0].items()}
    for d in masks[1:]:
        for n in out:
            out[n] |= d[n]
    return out


class KVDeltas(dict):
    """K/V entries read from a ``delta-fp16`` stage: W - W_0 at the union of masks (``apply_stage``)."""


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


def is_main_rank() -> bool:
    """True outside torch.distributed and on rank 0 (the only rank that writes or evaluates)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def ranks_agree(tensors: list[torch.Tensor]) -> tuple[int, str]:
    """(world size, sha256 of ``tensors``) after checking that every torch.distributed rank holds
    the same values (DDP must leave identical weights on every rank); raises ``RuntimeError`` naming
    the ranks' digests if not. Outside torch.distributed: (1, "") and nothing is hashed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1, ""
    digest = hash_tensors(tensors).hexdigest()[:16]
    digests: list = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"the ranks' trained weights differ after DDP (sha256 per rank: {digests}); nothing of this stage was saved")
    return len(digests), digest


def save_stage(
    folder: Path,
    kv: dict[str, torch.Tensor],
    all_masks: list[dict[str, torch.Tensor]],
    token_rows: torch.Tensor,
    selection: dict,
    info: dict,
    initial: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a completed stage (``all_masks``: masks of concepts 1..NN, this one last).

    ``initial``: W_0 per layer; when given, K/V are stored as fp16 deltas and the live ``kv`` are
    rounded to match (on every rank). Under torch.distributed only rank 0 writes files.
    """
    folder = Path(folder)
    union = union_masks(all_masks)
    if initial is not None:
        values, fmt = _round_to_deltas(kv, initial, union), "delta-fp16"
    else:
        values, fmt = {n: kv[n].detach().float().cpu()[union[n].cpu()] for n in kv}, "values-fp32"
    if not is_main_rank():
        return
    if folder.exists():
        shutil.rmtree(folder)
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    own = all_masks[-1]
    shapes = {n: "x".join(str(s) for s in m.shape) for n, m in own.items()}
    files = {
        "kv.safetensors": save_tensors(tmp / "kv.safetensors", values, metadata={"format": fmt}),
        "masks.safetensors": save_tensors(
            tmp / "masks.safetensors", {n: encode_mask(m) for n, m in own.items()}, metadata={**shapes, "format": "gaps-zlib"}
        ),
        "token.safetensors": save_tensors(tmp / "token.safetensors", {"embedding": token_rows.detach().float().cpu()}),
        "selection.json": save_json(tmp / "selection.json", selection),
        "stage.json": save_json(tmp / "stage.json", info),
    }
    write_manifest(tmp, files)
    tmp.rename(folder)


@torch.no_grad()
def _round_to_deltas(kv: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], union: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp16 deltas W - W_0 at the union; writes W_0 + delta back into ``kv`` (exactly what
    ``apply_stage`` will rebuild). A layer whose deltas overflow fp16 keeps fp32 deltas."""
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


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _masks_from(folder: Path, files: dict) -> dict[str, torch.Tensor]:
    stored = load_tensors(folder / "masks.safetensors", files["masks.safetensors"])
    meta = _metadata(folder / "masks.safetensors")
    shape = {n: tuple(int(s) for s in meta[n].split("x")) for n in stored}
    if meta.get("format") == "gaps-zlib":
        return {n: decode_mask(d, shape[n]) for n, d in stored.items()}
    return {n: unpack_mask(p, shape[n]) for n, p in stored.items()}  # bit-packed (older folders)


def _kv_from(folder: Path, files: dict) -> dict[str, torch.Tensor]:
    values = load_tensors(folder / "kv.safetensors", files["kv.safetensors"])
    return KVDeltas(values) if _metadata(folder / "kv.safetensors").get("format") == "delta-fp16" else values


def load_stage(folder: Path) -> dict:
    """Read a completed stage folder (hashes verified): masks, kv values, token rows, info."""
    folder = Path(folder)
    if not verify_folder(folder):
        raise CheckpointError(f"{folder}: incomplete stage (no manifest.json). Delete it and rerun: the stage is retrained.")
    files = load_json(folder / "manifest.json")["files"]
    return dict(
        masks=_masks_from(folder, files),
        kv=_kv_from(folder, files),
        token=load_tensors(folder / "token.safetensors", files["token.safetensors"])["embedding"],
        selection=load_json(folder / "selection.json"),
        info=load_json(folder / "stage.json"),
    )


def completed_stages(run_dir: Path, names: list[str]) -> list[dict]:
    """The longest prefix of the sequence whose stage folders are complete and intact.

    Unfinished folders (no manifest) are removed so the stage restarts cleanly. A damaged folder
    (hash mismatch) stops the prefix there, with a warning naming it; it and later stages are redone.
    """
    import warnings

    out = []
    for i, name in enumerate(names):
        folder = stage_dir(run_dir, i, name)
        for leftover in (folder.with_name(folder.name + ".partial"),):
            if leftover.exists():
                shutil.rmtree(leftover)
        if not folder.exists():
            break
        try:
            stage = load_stage(folder)
        except CheckpointError as e:
            warnings.warn(f"{e} Falling back to the last good stage ({i}); stages from {i + 1} on are retrained.")
            break
        if stage["info"].get("concept") != name:
            raise CheckpointError(
                f"{folder}: holds concept {stage['info'].get('concept')!r} but the sequence has {name!r} at position {i + 1}. "
                "Use another run folder (name=...) or restore the original sequence."
            )
        out.append(stage)
    # stages after the prefix belong to an older attempt: drop them so they are retrained
    for j in range(len(out), len(names)):
        folder = stage_dir(run_dir, j, names[j])
        if folder.exists():
            shutil.rmtree(folder)
    return out


def apply_stage(kv: dict[str, torch.nn.Parameter], initial: dict[str, torch.Tensor], all_masks: list[dict[str, torch.Tensor]], values: dict[str, torch.Tensor]) -> None:
    """Write a stage's saved K/V into the model (entries outside the union = base model).

    ``values``: fp32 values at the union, or a ``KVDeltas`` (from a ``delta-fp16`` stage) of W - W_0.
    """
    union = union_masks(all_masks)
    deltas = isinstance(values, KVDeltas)
    with torch.no_grad():
        for n, p in kv.items():
            w = initial[n].detach().clone().to(p.device, torch.float32)
            u = union[n].to(p.device)
            w[u] = (w[u] + values[n].to(p.device).float()) if deltas else values[n].to(p.device)
            p.data.copy_(w.to(p.dtype))
