"""A run's saved state: one folder per completed stage, safetensors and JSON only.

``<run>/stages/NN_<concept>/`` holds, for the model after stage NN:

* the files the run's method keeps (``Method.end_stage``; CNS and its ablations: K/V at the union of
  masks as fp16 deltas, the concept's mask, its token row, ``methods/kv_store.py``; textual
  inversion: the token row);
* ``stage.json``: concept, token, steps, time, and which method wrote the folder (``method``,
  ``method_target``) in which layout (``format``, ``methods.FORMAT_VERSION``; absent in folders of
  the release before ``methods/``: format 0);
* ``manifest.json``: every file's sha256, written last. A folder without it is an unfinished stage.

Writing goes through ``checkpoint.atomic_folder`` (a ``.partial`` folder renamed at the end);
reading (:func:`read_stage`) verifies every hash and loads every listed file, whatever the method.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

from safetensors import safe_open

from .checkpoint import MANIFEST, CheckpointError, atomic_folder, load_json, load_tensors, save_json, save_tensors, verify_folder, write_manifest
from .distributed import is_main_rank
from .methods.base import SavedStage, StageFiles

STAGE_INFO = "stage.json"


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    return Path(run_dir) / "stages" / f"{index + 1:02d}_{safe_name(name)}"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_stage(folder: Path, files: StageFiles, info: dict) -> None:
    """Write a completed stage: the method's ``files``, ``stage.json`` (``info``), the manifest
    last, atomically. Under torch.distributed only rank 0 writes."""
    if not is_main_rank():
        return
    folder = Path(folder)
    with atomic_folder(folder, temp=folder.with_name(folder.name + ".partial")) as tmp:
        hashes = {name: save_tensors(tmp / name, tensors, metadata=meta) for name, (tensors, meta) in files.tensors.items()}
        hashes.update({name: save_json(tmp / name, obj) for name, obj in files.json.items()})
        hashes[STAGE_INFO] = save_json(tmp / STAGE_INFO, info)
        write_manifest(tmp, hashes)


def _metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def read_stage(folder: Path) -> SavedStage:
    """Read a completed stage folder (hashes verified): every file its manifest lists."""
    folder = Path(folder)
    if not verify_folder(folder):
        raise CheckpointError(f"{folder}: incomplete stage (no {MANIFEST}). Delete it and rerun: the stage is retrained.")
    files = load_json(folder / MANIFEST)["files"]
    tensors, metadata, json = {}, {}, {}
    for name, sha in sorted(files.items()):
        if name.endswith(".safetensors"):
            tensors[name] = load_tensors(folder / name, sha)
            metadata[name] = _metadata(folder / name)
        elif name.endswith(".json"):
            json[name] = load_json(folder / name)
    if STAGE_INFO not in json:
        raise CheckpointError(f"{folder}: has no {STAGE_INFO}. Delete that stage folder and rerun the run to redo it.")
    return SavedStage(folder=folder, tensors=tensors, metadata=metadata, json=json)


def check_concept(stage: SavedStage, name: str, position: int, fix: str) -> None:
    if stage.info.get("concept") != name:
        raise CheckpointError(f"{stage.folder}: holds concept {stage.info.get('concept')!r} but the sequence has {name!r} at position {position}. {fix}")


def completed_stages(run_dir: Path, names: list[str]) -> list[SavedStage]:
    """The longest prefix of the sequence whose stage folders are complete and intact (the loop's
    resume: it cleans up). Unfinished folders (no manifest) are removed so the stage restarts
    cleanly. A damaged folder (hash mismatch) stops the prefix there, with a warning naming it; it
    and later stages are redone."""
    out = []
    for i, name in enumerate(names):
        folder = stage_dir(run_dir, i, name)
        leftover = folder.with_name(folder.name + ".partial")
        if leftover.exists():
            shutil.rmtree(leftover)
        if not folder.exists():
            break
        try:
            stage = read_stage(folder)
        except CheckpointError as e:
            warnings.warn(f"{e} Falling back to the last good stage ({i}); stages from {i + 1} on are retrained.")
            break
        check_concept(stage, name, i + 1, "Use another run folder (name=...) or restore the original sequence.")
        out.append(stage)
    # stages after the prefix belong to an older attempt: drop them so they are retrained
    for j in range(len(out), len(names)):
        folder = stage_dir(run_dir, j, names[j])
        for d in (folder, folder.with_name(folder.name + ".partial")):
            if d.exists():
                shutil.rmtree(d)
    return out
