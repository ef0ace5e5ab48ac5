"""The continual loop through the Hydra entry point: a 3-concept sequence, resume, sweeps, errors."""

import hashlib
import json

import pytest
import shutil
from pathlib import Path

from conftest import FAST, concepts_override, run_cli


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_dir(tmp_path, method="cns", seed=0, name="default") -> Path:
    return tmp_path / "out" / name / method / f"seed{seed}"


def test_three_concepts_train_save_and_resume(tmp_path, concept_dirs, env):
    args = [concepts_override(concept_dirs), *FAST]
    run_cli(args, env)
    run = _run_dir(tmp_path)
    stages = sorted((run / "stages").iterdir())
    assert [s.name for s in stages] == ["01_teddy", "02_mug", "03_vase"]
    for s in stages:
        assert {p.name for p in s.iterdir()} == {"kv.safetensors", "masks.safetensors", "token.safetensors", "selection.json", "stage.json", "manifest.json"}
        sel = json.loads((s / "selection.json").read_text())
        assert 0 < sel["total"]["concept_density"] < 1
        assert 0 <= sel["total"]["general_share_of_base"] <= 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and len(summary["stages"]) == 3
    phases = summary["phases"]  # where the time went (phases.py); FAST turns evaluation off
    assert set(phases) == {"build", "priors", "compile", "training", "saving", "evaluation", "total"}
    assert phases["build"] > 0 and phases["training"] > 0 and phases["saving"] > 0 and phases["priors"] > 0
    assert phases["compile"] == 0 and phases["evaluation"] < 0.5  # nothing compiled on a CPU; no evaluator
    assert phases["total"] == pytest.approx(sum(v for k, v in phases.items() if k != "total"), abs=0.01)
    final = {s.name: _hash(s / "kv.safetensors") for s in stages}
    stage1_mtime = (stages[0] / "manifest.json").stat().st_mtime_ns

    # interruption: stage 3 never finished (no manifest), stage 2's folder is gone
    shutil.rmtree(stages[1])
    (stages[2] / "manifest.json").unlink()
    proc = run_cli(args, env)
    assert "resuming" in proc.stdout + proc.stderr
    assert (stages[0] / "manifest.json").stat().st_mtime_ns == stage1_mtime, "a completed stage was retrained"
    again = {s.name: _hash(s / "kv.safetensors") for s in sorted((run / "stages").iterdir())}
    assert again == final, "resumed run differs from the uninterrupted one"

    # a rerun of a complete run trains nothing and changes nothing
    run_cli(args, env)
    assert {s.name: _hash(s / "kv.safetensors") for s in sorted((run / "stages").iterdir())} == final


def test_changed_settings_do_not_resume_silently(tmp_path, concept_dirs, env):
    run_cli([concepts_override(concept_dirs[:1]), *FAST], env)
    proc = run_cli([concepts_override(concept_dirs[:1]), *FAST, "method.lambda1=0.5"], env, check=False)
    assert proc.returncode != 0
    assert "other settings" in proc.stderr and "method" in proc.stderr


def test_config_typo_is_a_readable_error(concept_dirs, env):
    proc = run_cli([concepts_override(concept_dirs[:1]), "methd.steps=3"], env, check=False)
    assert proc.returncode != 0
    assert "methd" in proc.stderr
    proc = run_cli([concepts_override(concept_dirs[:1]), "method=cnss"], env, check=False)
    assert proc.returncode != 0 and "cnss" in proc.stderr
    proc = run_cli([concepts_override(concept_dirs[:1]), "method.selection.threshold=median"], env, check=False)
    assert proc.returncode != 0 and "method.selection.threshold" in proc.stderr


def test_multirun_over_methods(tmp_path, concept_dirs, env):
    run_cli(["-m", concepts_override(concept_dirs[:2]), *FAST, "method=cns,random_neurons,no_reg,full_kv,textual_inversion"], env)
    for method in ("cns", "random_neurons", "no_reg", "full_kv", "textual_inversion"):
        run = tmp_path / "out" / "default" / "multirun" / method / "seed0"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["method"] == method and summary["status"] == "complete"
        entries = [s["concept_entries"] for s in summary["stages"]]
        if method == "full_kv":
            assert all(e == entries[0] > 0 for e in entries)
        elif method == "textual_inversion":
            assert entries == [0, 0]
        else:
            assert all(e > 0 for e in entries)
    cns = json.loads((tmp_path / "out/default/multirun/cns/seed0/summary.json").read_text())
    rnd = json.loads((tmp_path / "out/default/multirun/random_neurons/seed0/summary.json").read_text())
    assert [s["concept_entries"] for s in cns["stages"]] == [s["concept_entries"] for s in rnd["stages"]]


def test_console_names_each_stage_and_ends_with_a_summary_and_the_report_path(tmp_path, concept_dirs, env):
    proc = run_cli([concepts_override(concept_dirs[:2]), *FAST, "eval.enabled=true", "eval.n_images=1", "eval.max_prompts=1", "eval.num_inference_steps=2"], env)
    run = _run_dir(tmp_path)
    out = proc.stdout
    assert "[cns] stage 1/2: teddy (<new1>, cns, 4 steps)" in out and "[cns] stage 2/2: mug (<new2>, cns, 4 steps)" in out
    assert out.index("stage 1/2: teddy") < out.index("stage 2/2: mug")
    assert f"[cns] complete: 2 of 2 concepts (teddy, mug) in {run}" in out
    assert f"  report: {run / 'report.md'}" in out and (run / "report.md").is_file()
    assert "  concepts learned: " in out and " of 2; still learned after the last stage: " in out
