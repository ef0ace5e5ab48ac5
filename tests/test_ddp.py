"""The whole continual loop under torchrun with 2 processes (gloo on the CPU): the loop's DDP path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import FAST, ROOT, concepts_override

DDP_CPU = ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.callbacks=[]", "trainer.benchmark=false"]


@pytest.mark.parametrize("trainer", ["ddp", "ddp_masked", "ddp_compact"])  # dense all-reduce / masked entries / no DDP wrapper
def test_two_ranks_train_identical_weights_and_rank0_saves(tmp_path, concept_dirs, env, trainer):
    args = [concepts_override(concept_dirs[:2]), *FAST, "prior.num_images=4", f"trainer={trainer}", *DDP_CPU]
    evaluate = trainer == "ddp_compact"  # one of them with the evaluation on: its images split over the ranks
    if evaluate:
        args += ["++eval.enabled=true", "eval.num_inference_steps=2", "eval.max_prompts=1", "eval.n_images=3", "eval.batch_size=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cns_lightning", *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    run = tmp_path / "out" / "default" / "cns" / "seed0"
    stages = sorted((run / "stages").iterdir())
    assert [s.name for s in stages] == ["01_teddy", "02_mug"]
    for s in stages:
        assert (s / "manifest.json").is_file()
        info = json.loads((s / "stage.json").read_text())
        assert info["ranks"] == 2 and len(info["weights_sha256"]) == 16  # the all-gathered digests were equal
    assert json.loads((run / "summary.json").read_text())["status"] == "complete"
    if evaluate:  # both ranks evaluated (collectives matched), rank 0 wrote every row
        state = json.loads((run / "eval" / "state.json").read_text())
        assert state["stages_done"] == [1, 2] and (run / "eval" / "results.json").is_file()
    priors = tmp_path / "cache" / "priors"
    folders = sorted(d for d in priors.iterdir() if d.is_dir())
    assert len(folders) == 2 and not any(".tmp" in d.name for d in folders), [d.name for d in folders]
    for d in folders:  # rank r wrote images r, r+2: one folder, complete
        assert sorted(p.name for p in d.glob("*.png")) == [f"{i:04d}.png" for i in range(4)]
        assert (d / "done.json").is_file()
