"""Continual use through the CLI: extend a finished run with new concepts, rerun a finished command,
refuse changed earlier concepts, and start a new sequence from an exported model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from conftest import FAST, concepts_override, run_cli

# a real (tiny) evaluation, as small as it gets: the forgetting matrices must grow
EVAL = [f for f in FAST if "eval.enabled" not in f] + ["eval.n_images=1", "eval.num_inference_steps=2", "eval.max_prompts=1", "eval.max_pairs=1"]
CLASSES = ("teddy bear", "mug", "vase")


def files(run: Path) -> dict[str, tuple[int, str]]:
    """Every file of a run folder (``.hydra/`` and the log included): mtime and sha256."""
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_finished_run_is_extended_rerun_untouched_and_not_reordered(tmp_path, concept_dirs, env):
    run = tmp_path / "out" / "default" / "cns" / "seed0"
    two = [concepts_override(concept_dirs[:2], CLASSES[:2]), *EVAL]
    run_cli(two, env)
    before = files(run)
    assert ".hydra/overrides.yaml" in before and json.loads((run / "summary.json").read_text())["status"] == "complete"

    # rerunning the finished command: says so, trains and evaluates nothing, changes no file
    proc = run_cli(two, env)
    assert "is complete" in proc.stdout and "resuming" not in proc.stdout
    assert files(run) == before

    # another order of the same concepts: refused, naming the difference and the way to a new run; nothing touched
    moved = [concepts_override([concept_dirs[1], concept_dirs[0]], CLASSES[1::-1]), *EVAL]
    proc = run_cli(moved, env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "data.concepts[0] was 'teddy' and is now 'mug'" in proc.stderr and "its own run folder" in proc.stderr
    assert files(run) == before

    # a third concept after the two: only it trains; stages 1-2 stay byte for byte; the matrices grow
    old = json.loads((run / "eval" / "state.json").read_text())
    three = [concepts_override(concept_dirs, CLASSES), *EVAL]
    proc = run_cli(three, env)
    assert "extending" in proc.stdout and "continuing with stage 3 of 3 (vase)" in proc.stdout
    after = files(run)
    for name, meta in before.items():
        if name.startswith("stages/"):
            assert after[name] == meta, f"{name} of a completed stage changed"
    assert sorted(p.name for p in (run / "stages").iterdir()) == ["01_teddy", "02_mug", "03_vase"]
    state = json.loads((run / "eval" / "state.json").read_text())
    assert state["concepts"] == ["teddy", "mug", "vase"] and state["stages_done"] == [1, 2, 3]
    R = state["matrices"]["clip_i"]
    assert len(R) == 3 and all(v is not None for v in R[2]) and R[0][1] is None
    assert [row[:2] for row in R[:2]] == [row for row in old["matrices"]["clip_i"]], "rows of the finished stages changed"
    assert set(state["base"]["clip_i"]) == {"teddy", "mug", "vase"}  # the new concept's base score, on the base model
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and [s["concept"] for s in summary["stages"]] == ["teddy", "mug", "vase"]
    assert "3:vase" in (run / "report.md").read_text()
    assert "teddy" in (run / ".hydra" / "overrides.yaml").read_text() and "vase" in (run / ".hydra" / "overrides.yaml").read_text()


def test_a_new_sequence_starts_from_an_exported_model(tmp_path, concept_dirs, env):
    from cns_lightning.export import export_pipeline
    from cns_lightning.models import load_pipeline
    from cns_lightning.prior import model_fingerprint

    run_cli([concepts_override(concept_dirs[:2], CLASSES[:2]), *FAST], env)
    exported = export_pipeline(tmp_path / "out" / "default" / "cns" / "seed0", tmp_path / "exported")
    base = [concepts_override(concept_dirs[2:], CLASSES[2:]), *FAST, "model=sd15", f"model.path={exported}", "model.resolution=32", "name=next"]
    run_cli(base, env)
    run = tmp_path / "out" / "next" / "cns" / "seed0"
    assert json.loads((run / "base_model.json").read_text())["fingerprint"] == model_fingerprint(load_pipeline(str(exported)))
    summary = json.loads((run / "summary.json").read_text())
    # the export's own tokens stay its concepts'; the new concept gets the next free one
    assert summary["status"] == "complete" and summary["concepts"][0]["token"] == "<new3>"
