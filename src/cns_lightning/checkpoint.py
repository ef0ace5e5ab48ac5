"""Crash-safe files for stage outputs: atomic file and folder writes, hashed safetensors, JSON.

A stage folder is complete when its ``manifest.json`` exists and every file it lists has the
recorded sha256. The manifest is written last (:func:`write_manifest`), so a crash at any point
leaves either a complete stage or a folder without a manifest, which the run redoes.

Every problem raises :class:`CheckpointError`, whose message names the file, what is wrong and the
fix. Nothing here unpickles: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

__all__ = [
    "MANIFEST",
    "CheckpointError",
    "atomic_folder",
    "atomic_write_bytes",
    "disk_free_check",
    "hash_tensors",
    "load_json",
    "load_tensors",
    "save_json",
    "save_tensors",
    "sha256_bytes",
    "replace_folder",
    "verify_folder",
    "write_manifest",
]

MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, damaged or cannot be written; the message names the fix."""


def _redo(stage: Path) -> str:
    return (f"delete the stage folder {stage} and rerun the same command: the run resumes "
            "from the last good stage")


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def hash_tensors(tensors, h=None):
    """Feed each tensor's values (as fp32, row-major) into the hashlib object ``h`` (a new sha256 if
    None) and return it: the same values give the same digest on any device. Model fingerprints,
    cache keys and the DDP weight check use it."""
    h = hashlib.sha256() if h is None else h
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h


def _fsync_dir(folder: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows: directories cannot be opened for fsync
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_free_check(path: Path, needed_bytes: int,
                    fix: str = "point the output folder (hydra.run.dir=...) at a disk with more room") -> None:
    """Raise :class:`CheckpointError` when the disk holding ``path`` has < ``needed_bytes`` free.

    ``path`` may not exist yet: its nearest existing parent is measured. ``fix``: what to move.
    """
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise CheckpointError(
            f"{path}: not enough disk space in {folder}: {needed_bytes} bytes "
            f"({needed_bytes / 2**30:.2f} GiB) needed but only {free} bytes ({free / 2**30:.2f} GiB) "
            f"free. Fix: free disk space, or {fix}, then rerun the same command."
        )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one.

    The bytes go to a hidden temp file in the same folder, are flushed and fsynced, then
    ``os.replace`` moves them over ``path`` and the folder is fsynced. On any error the temp file
    is removed and ``path`` is untouched. The free space is checked first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    disk_free_check(path.parent, len(data))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def replace_folder(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` onto ``target`` (same parent), replacing what is there:
    readers see the old folder or the new one, never a mix. The old one is renamed aside first
    (``.<name>.old-<pid>``) and removed after; if the rename fails it is put back."""
    tmp, target = Path(tmp), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


@contextmanager
def atomic_folder(target: Path, temp: Path | None = None):
    """Write a folder that appears complete or not at all (stage folders, exports, generated images,
    prior images): yields a fresh temporary folder beside ``target`` (``temp``, emptied first, or a
    new hidden ``.<name>.*.partial``); when the block ends it replaces ``target``
    (:func:`replace_folder`); on an error it is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if temp is None:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    else:
        tmp = Path(temp)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    try:
        yield tmp
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _missing(path: Path, stage: Path) -> CheckpointError:
    what = "is a folder, not a file" if path.is_dir() else "file is missing"
    return CheckpointError(f"{path}: {what}. Fix: {_redo(stage)}.")


def _read(path: Path) -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise _missing(path, path.parent) from exc


def _sha256_file(path: Path, stage: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise _missing(path, stage) from exc
    return digest.hexdigest()


def _canonical_header(data: bytes) -> bytes:
    """Rewrite a safetensors header with sorted keys, so the file's bytes are reproducible.

    safetensors writes ``__metadata__`` from a Rust HashMap, whose order changes from process to
    process: the same stage saved twice would get different bytes and hashes. Key order does not
    matter to readers; tensor offsets are relative to the end of the header, so they stay valid.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)  # keep the data 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def save_tensors(path: Path, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> str:
    """Save ``tensors`` as a safetensors file, atomically; return the sha256 of its bytes.

    Tensors are made contiguous and moved to CPU; they must not share memory with each other.
    The same tensors and metadata always give the same bytes (see :func:`_canonical_header`).
    """
    flat = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    data = _canonical_header(_st_save(flat, metadata=metadata))
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def load_tensors(path: Path, expected_sha256: str | None = None,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file written by :func:`save_tensors`, verifying its sha256 when given.

    Raises :class:`CheckpointError` when the file is missing, does not match the hash (truncated,
    bytes flipped) or does not parse as safetensors.
    """
    path = Path(path)
    data = _read(path)
    if expected_sha256 is not None:
        actual = sha256_bytes(data)
        if actual != expected_sha256.lower():
            raise CheckpointError(
                f"{path}: file is damaged: its sha256 is {actual} but {expected_sha256} was recorded "
                f"({len(data)} bytes; truncated or modified). Fix: {_redo(path.parent)}."
            )
    try:
        tensors = _st_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({len(data)} bytes; truncated or corrupt: "
            f"{exc}). Fix: {_redo(path.parent)}."
        ) from exc
    if torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


def save_json(path: Path, obj: Any) -> str:
    """Write ``obj`` as JSON (sorted keys, indent 2, UTF-8), atomically; return its sha256."""
    data = (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def load_json(path: Path) -> Any:
    """Read a JSON file; :class:`CheckpointError` when missing, not UTF-8 or not valid JSON."""
    path = Path(path)
    data = _read(path)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text ({exc}). Fix: {_redo(path.parent)}.") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}). "
            f"Fix: {_redo(path.parent)}."
        ) from exc


def _check_name(folder: Path, name: str) -> Path:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or name in ("", ".", MANIFEST):
        raise CheckpointError(
            f"{folder / MANIFEST}: bad file name {name!r} (must be a relative path inside the "
            f"folder, not {MANIFEST}). Fix: {_redo(folder)}."
        )
    return folder / rel


def write_manifest(folder: Path, files: dict[str, str]) -> None:
    """Write ``folder/manifest.json`` listing ``files`` (relative path -> sha256). Call it LAST.

    Every listed file must exist (the hashes are the ones returned by the save functions and are
    not recomputed here).
    """
    folder = Path(folder)
    for name in files:
        if not _check_name(folder, name).is_file():
            raise CheckpointError(
                f"{folder / name}: listed for the manifest but missing. Fix: write the file before "
                "the manifest (this is a bug in the stage code)."
            )
    save_json(folder / MANIFEST, {"files": dict(files)})


def verify_folder(folder: Path) -> bool:
    """Is ``folder`` a complete stage? ``False`` when it (or its manifest) does not exist.

    With a manifest, every listed file must exist with its recorded sha256; otherwise
    :class:`CheckpointError` names the bad file. Files not in the manifest are ignored.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    content = load_json(manifest)
    files = content.get("files") if isinstance(content, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CheckpointError(f"{manifest}: has no \"files\" mapping of name -> sha256. "
                              f"Fix: {_redo(folder)}.")
    for name, expected in files.items():
        path = _check_name(folder, name)
        actual = _sha256_file(path, folder)
        if actual != expected:
            raise CheckpointError(
                f"{path}: file was modified or damaged after the stage completed: sha256 {actual}, "
                f"manifest says {expected}. Fix: {_redo(folder)}."
            )
    return True
