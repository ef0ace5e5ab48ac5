"""cns_lightning.checkpoint: round trips, damage detection, atomicity, manifests, disk space."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from cns_lightning import checkpoint as ck
from cns_lightning.checkpoint import (
    MANIFEST,
    CheckpointError,
    atomic_folder,
    atomic_write_bytes,
    disk_free_check,
    load_json,
    load_tensors,
    save_json,
    save_tensors,
    verify_folder,
    write_manifest,
)

FIX = "delete the stage folder"
_REAL_FDOPEN = os.fdopen
_HEADER = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
_HEADER_ONLY = len(_HEADER).to_bytes(8, "little") + _HEADER  # promises 16 bytes it lacks


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(5, 7, generator=g),
        "bf16": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(6, generator=g).to(torch.float16),
        "bool": torch.rand(7, 13, generator=g) > 0.5,
        "i64": torch.arange(-3, 9).reshape(3, 4),
        "strided": torch.randn(4, 6, generator=g).t(),  # non-contiguous view
        "scalar": torch.tensor(3.5),
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype, shape and bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return a.equal(b)
    return a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))


def _saved(tmp_path: Path) -> tuple[Path, str, dict[str, torch.Tensor]]:
    path = tmp_path / "stage" / "weights.safetensors"
    tensors = _tensors()
    return path, save_tensors(path, tensors, metadata={"concept": "dog"}), tensors


def test_tensor_round_trip_bit_identical(tmp_path):
    path, sha, tensors = _saved(tmp_path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    for expected in (None, sha, sha.upper()):
        loaded = load_tensors(path, expected_sha256=expected)
        assert set(loaded) == set(tensors)
        for k in tensors:
            assert _same(loaded[k], tensors[k]), k
    assert [p.name for p in path.parent.iterdir()] == ["weights.safetensors"]  # no temp left over


def test_truncated_tensor_file(tmp_path):
    path, sha, _ = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"weights.safetensors.*sha256.*{FIX}"):
        load_tensors(path, expected_sha256=sha)
    with pytest.raises(CheckpointError, match=f"weights.safetensors.*not a readable safetensors.*{FIX}"):
        load_tensors(path)  # no hash: the parser still notices


def test_flipped_byte_detected_by_hash(tmp_path):
    path, sha, tensors = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the tensor data: still parses
    path.write_bytes(bytes(data))
    assert set(load_tensors(path)) == set(tensors)  # which is why the hash matters
    with pytest.raises(CheckpointError, match=f"damaged.*{sha}.*{FIX}.*rerun the same command"):
        load_tensors(path, expected_sha256=sha)


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\xff" * 8 + b"{}", _HEADER_ONLY])
def test_garbage_tensor_file(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"bad.safetensors.*not a readable safetensors.*{FIX}"):
        load_tensors(path)


def test_missing_tensor_file(tmp_path):
    with pytest.raises(CheckpointError, match=f"nope.safetensors: file is missing.*{FIX} {tmp_path}"):
        load_tensors(tmp_path / "nope.safetensors")


def test_json_round_trip_and_format(tmp_path):
    obj = {"b": [1, 2.5, None], "a": {"z": "ü", "y": True}}
    sha = save_json(tmp_path / "s.json", obj)
    raw = (tmp_path / "s.json").read_bytes()
    assert sha == hashlib.sha256(raw).hexdigest()
    assert raw.decode() == json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert load_json(tmp_path / "s.json") == obj


def test_json_errors(tmp_path):
    with pytest.raises(CheckpointError, match=f"missing.json: file is missing.*{FIX}"):
        load_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(CheckpointError, match=f"bad.json: not valid JSON.*line 3.*{FIX}"):
        load_json(tmp_path / "bad.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match=f"bin.json: not UTF-8.*{FIX}"):
        load_json(tmp_path / "bin.json")


# ----------------------------------------------------------------------------------------------
# manifests


def _stage(tmp_path: Path) -> Path:
    stage = tmp_path / "stage_01"
    files = {
        "weights.safetensors": save_tensors(stage / "weights.safetensors", _tensors()),
        "masks/dog.safetensors": save_tensors(stage / "masks" / "dog.safetensors",
                                              {"k": torch.ones(12, dtype=torch.uint8)}),
        "state.json": save_json(stage / "state.json", {"step": 500}),
    }
    assert verify_folder(stage) is False  # no manifest yet: incomplete stage
    write_manifest(stage, files)
    return stage


def test_manifest_complete_stage(tmp_path):
    stage = _stage(tmp_path)
    assert verify_folder(stage) is True
    assert set(load_json(stage / MANIFEST)["files"]) == {"weights.safetensors", "masks/dog.safetensors",
                                                         "state.json"}
    (stage / "extra.log").write_text("not listed: ignored")
    assert verify_folder(stage) is True
    assert verify_folder(tmp_path / "never_started") is False


def test_manifest_detects_modified_file(tmp_path):
    stage = _stage(tmp_path)
    save_json(stage / "state.json", {"step": 499})
    with pytest.raises(CheckpointError, match=f"state.json: file was modified.*{FIX} {stage}"):
        verify_folder(stage)


def test_manifest_detects_missing_file(tmp_path):
    stage = _stage(tmp_path)
    (stage / "masks" / "dog.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"dog.safetensors: file is missing.*{FIX} {stage}"):
        verify_folder(stage)


def test_manifest_damaged_or_bad(tmp_path):
    stage = _stage(tmp_path)
    (stage / MANIFEST).write_text('{"files": ')
    with pytest.raises(CheckpointError, match="manifest.json: not valid JSON"):
        verify_folder(stage)
    (stage / MANIFEST).write_text('{"files": ["a"]}')
    with pytest.raises(CheckpointError, match="manifest.json: has no \"files\" mapping"):
        verify_folder(stage)
    (stage / MANIFEST).write_text('{"files": {"../escape": "00"}}')
    with pytest.raises(CheckpointError, match="bad file name '../escape'"):
        verify_folder(stage)


def test_write_manifest_refuses_unwritten_files(tmp_path):
    stage = tmp_path / "s"
    stage.mkdir()
    with pytest.raises(CheckpointError, match="ghost.bin: listed for the manifest but missing"):
        write_manifest(stage, {"ghost.bin": "00"})
    with pytest.raises(CheckpointError, match="bad file name"):
        write_manifest(stage, {MANIFEST: "00"})
    assert not (stage / MANIFEST).exists()


# ----------------------------------------------------------------------------------------------
# atomicity and disk space


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("crash_at", ["replace", "fsync", "write"])
def test_crash_mid_write_keeps_old_file(tmp_path, monkeypatch, crash_at):
    path = tmp_path / "state.json"
    save_json(path, {"good": 1})
    old = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(f"simulated crash in {crash_at}")

    if crash_at == "write":
        monkeypatch.setattr(ck.os, "fdopen", lambda fd, mode: _BrokenFile(fd))
    else:
        monkeypatch.setattr(ck.os, crash_at, boom)
    with pytest.raises(OSError, match="simulated"):
        save_json(path, {"new": 2})
    monkeypatch.undo()
    assert path.read_bytes() == old  # the old file is intact
    assert _visible(tmp_path) == ["state.json"]  # and the temp file is gone
    assert load_json(path) == {"good": 1}


class _BrokenFile:
    """A file object whose write dies half-way (a crash while writing the temp file)."""

    def __init__(self, fd):
        self._f = _REAL_FDOPEN(fd, "wb")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        raise OSError("simulated crash in write")


def test_atomic_write_creates_folders_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "f.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and _visible(path.parent) == ["f.bin"]
    assert (path.stat().st_mode & 0o777) == 0o644


def test_disk_free_check(tmp_path):
    disk_free_check(tmp_path, 1)
    disk_free_check(tmp_path / "not" / "yet" / "made", 1)  # measured at the nearest parent
    with pytest.raises(CheckpointError) as err:
        disk_free_check(tmp_path / "out", 10**18)
    msg = str(err.value)
    assert str(tmp_path) in msg and "not enough disk space" in msg
    assert str(10**18) in msg and "free" in msg and "Fix: free disk space" in msg


def test_atomic_write_refuses_when_disk_too_small(tmp_path, monkeypatch):
    path = tmp_path / "big.bin"
    path.write_bytes(b"old")
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: ck.shutil._ntuple_diskusage(10, 10, 2))
    with pytest.raises(CheckpointError, match="not enough disk space.*3 bytes.*2 bytes"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and _visible(tmp_path) == ["big.bin"]


class _Evil:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_checkpoint_is_refused_not_executed(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.safetensors"
    torch.save({"w": torch.zeros(2), "x": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_tensors(path)
    assert not marker.exists()
    source = Path(ck.__file__).read_text()
    assert "import pickle" not in source and "torch.load(" not in source


def test_hash_tensors_depends_on_values_only():
    import hashlib

    from cns_lightning.checkpoint import hash_tensors

    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    same = [a.clone(), a.t().contiguous().t(), a.to(torch.float64)]  # other memory layout, other dtype
    digests = {hash_tensors([x]).hexdigest() for x in same}
    assert digests == {hash_tensors([a]).hexdigest()}
    b = a.clone()
    b[2, 3] += 1
    assert hash_tensors([b]).hexdigest() != hash_tensors([a]).hexdigest()
    h = hashlib.sha256(b"prefix")  # feeds a given hash and returns it
    assert hash_tensors([a], h) is h and h.hexdigest() == hashlib.sha256(b"prefix" + a.numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# atomic folders


def test_atomic_folder_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []  # the temporary folder is gone too
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("one")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):  # a failed rewrite leaves the old folder untouched
        with atomic_folder(target) as tmp:
            raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "one"
    with atomic_folder(target, temp=tmp_path / "out.partial") as tmp:  # a fixed temporary name, emptied first
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
