"""A run's saved state: one folder per completed stage, safetensors and JSON only.

``<run>/stages/NN_<concept>/`` holds, for the model after stage NN:

* ``kv.safetensors``: the K/V values at every entry any concept so far may have changed (the OR of
  masks 1..NN), flattened per layer, fp32 (exact); all other entries equal the base model's;
* ``masks.safetensors``: this concept's mask per layer, bit-packed (8 entries per byte);
* ``token.safetensors``: this concept's token embedding row;
* ``selection.json`` (mask statistics) and ``stage.json`` (concept, token, steps, losses, time);
* ``manifest.json``: every file's sha256, written last. A folder without it is an unfinished stage.

Only masks are kept per concept: no per-concept weights (one model holds every concept).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_json, load_tensors, pack_mask, save_json, save_tensors, unpack_mask, verify_folder, write_manifest

STAGE_RE = re.compile(r"^(\d\d)_(.+)$")


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


def save_stage(
    folder: Path,
    kv: dict[str, torch.Tensor],
    all_masks: list[dict[str, torch.Tensor]],
    token_rows: torch.Tensor,
    selection: dict,
    info: dict,
) -> None:
    """Write a completed stage (``all_masks``: masks of concepts 1..NN, this one last)."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    union = union_masks(all_masks)
    values = {n: kv[n].detach().float().cpu()[union[n].cpu()] for n in kv}
    own = all_masks[-1]
    shapes = {n: "x".join(str(s) for s in m.shape) for n, m in own.items()}
    files = {
        "kv.safetensors": save_tensors(tmp / "kv.safetensors", values),
        "masks.safetensors": save_tensors(tmp / "masks.safetensors", {n: pack_mask(m.cpu()) for n, m in own.items()}, metadata=shapes),
        "token.safetensors": save_tensors(tmp / "token.safetensors", {"embedding": token_rows.detach().float().cpu()}),
        "selection.json": save_json(tmp / "selection.json", selection),
        "stage.json": save_json(tmp / "stage.json", info),
    }
    write_manifest(tmp, files)
    tmp.rename(folder)


def _masks_from(folder: Path, files: dict) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    packed = load_tensors(folder / "masks.safetensors", files["masks.safetensors"])
    with safe_open(str(folder / "masks.safetensors"), "pt") as f:
        meta = f.metadata() or {}
    return {n: unpack_mask(p, tuple(int(s) for s in meta[n].split("x"))) for n, p in packed.items()}


def load_stage(folder: Path) -> dict:
    """Read a completed stage folder (hashes verified): masks, kv values, token rows, info."""
    folder = Path(folder)
    if not verify_folder(folder):
        raise CheckpointError(f"{folder}: incomplete stage (no manifest.json). Delete it and rerun: the stage is retrained.")
    files = load_json(folder / "manifest.json")["files"]
    return dict(
        masks=_masks_from(folder, files),
        kv=load_tensors(folder / "kv.safetensors", files["kv.safetensors"]),
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
    """Write a stage's saved K/V values into the model (entries outside the union = base model)."""
    union = union_masks(all_masks)
    with torch.no_grad():
        for n, p in kv.items():
            w = initial[n].detach().clone().to(p.device, torch.float32)
            w[union[n].to(p.device)] = values[n].to(p.device)
            p.data.copy_(w.to(p.dtype))
