"""state.py: stage folders hold whatever a method saves; written atomically, read back verified."""

from __future__ import annotations

import pytest
import torch

from cns_lightning.checkpoint import CheckpointError
from cns_lightning.methods.base import StageFiles
from cns_lightning.state import completed_stages, read_stage, stage_dir, write_stage


def _files(k: int) -> StageFiles:
    return StageFiles(tensors={"lora.safetensors": ({"a": torch.full((2, 3), float(k))}, {"rank": "4"}), "token.safetensors": ({"embedding": torch.ones(5)}, None)},
                      json={"extra.json": {"k": k}})


def test_any_method_files_round_trip(tmp_path):
    folder = stage_dir(tmp_path, 0, "my dog!")
    assert folder.name == "01_my_dog_"
    write_stage(folder, _files(7), {"concept": "my dog!", "format": 1})
    s = read_stage(folder)
    assert torch.equal(s.tensors["lora.safetensors"]["a"], torch.full((2, 3), 7.0)) and s.metadata["lora.safetensors"] == {"rank": "4"}
    assert s.json["extra.json"] == {"k": 7} and s.info == {"concept": "my dog!", "format": 1} and s.format == 1
    assert sorted(p.name for p in tmp_path.joinpath("stages").iterdir()) == ["01_my_dog_"]  # no .partial left
    write_stage(folder, _files(8), {"concept": "my dog!"})  # rewriting replaces the folder whole
    assert read_stage(folder).json["extra.json"] == {"k": 8} and read_stage(folder).format == 0


def test_completed_stages_is_the_intact_prefix_and_cleans_up(tmp_path):
    names = ["a", "b", "c"]
    for i, n in enumerate(names):
        write_stage(stage_dir(tmp_path, i, n), _files(i), {"concept": n})
    stage_dir(tmp_path, 2, "c").with_name("03_c.partial").mkdir()  # a kill while stage 3 was rewritten
    (stage_dir(tmp_path, 1, "b") / "lora.safetensors").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match=r"02_b/lora.safetensors: file was modified or damaged.*Falling back to the last good stage \(1\)"):
        done = completed_stages(tmp_path, names)
    assert [s.info["concept"] for s in done] == ["a"]
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["01_a"]  # damaged and later stages go, to be retrained
    write_stage(stage_dir(tmp_path / "other", 0, "z"), _files(0), {"concept": "a"})
    with pytest.raises(CheckpointError, match=r"01_z: holds concept 'a' but the sequence has 'z' at position 1"):
        completed_stages(tmp_path / "other", ["z"])
    with pytest.raises(CheckpointError, match="incomplete stage"):
        read_stage(tmp_path / "stages" / "nope")
