"""Sweep aggregation over run folders written by the real evaluator on the tiny pipeline."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from test_evaluation import add_tokens, make_concepts, run_sequence

from cns_lightning.evaluation.aggregate import aggregate, main
from cns_lightning.evaluation.forgetting import final_mean
from cns_lightning.models import build_random_pipeline


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two methods x seed 0 run by the evaluator; a copy of one as seed 1 with every score + 2."""
    root = tmp_path_factory.mktemp("sweep")
    concepts = make_concepts(root / "data", names=(("teddy", "teddy bear"), ("mug", "mug")))
    states = {}
    for method in ("cns", "full_kv"):
        pipe = build_random_pipeline("tiny")
        add_tokens(pipe, concepts)
        run_dir = root / "multirun" / method / "seed0"
        ev, _ = run_sequence(run_dir, concepts, pipe, n_images=1, best_of=2, guidance_scale=6.0, write_report=False)  # CFG path
        (run_dir / "summary.json").write_text(json.dumps({"method": method, "seed": 0, "concepts": [c.name for c in concepts]}))
        states[method] = ev.state
    src, dst = root / "multirun" / "cns" / "seed0", root / "multirun" / "cns" / "seed1"
    shutil.copytree(src, dst)
    st = json.loads((dst / "eval" / "state.json").read_text())
    for key, M in st["matrices"].items():
        st["matrices"][key] = [[None if v is None else v + 2.0 for v in row] for row in M]
    for k in st["multi"]:
        if k in ("clip_i", "clip_t", "clip_i_best", "clip_t_best"):
            st["multi"][k] += 2.0
    (dst / "eval" / "state.json").write_text(json.dumps(st))
    (dst / "summary.json").write_text(json.dumps({"method": "cns", "seed": 1, "concepts": ["teddy", "mug"]}))
    return root / "multirun", states


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_tables_average_over_seeds(sweep, tmp_path):
    sweep_dir, states = sweep
    paths = aggregate(sweep_dir, tmp_path / "agg")
    rows = {r["method"]: r for r in _csv(paths["table_ablation_csv"])}
    assert set(rows) == {"cns", "full_kv"} and rows["cns"]["n_seeds"] == "2" and rows["full_kv"]["n_seeds"] == "1"
    cns = final_mean(states["cns"].matrices["clip_i"])
    assert float(rows["cns"]["single_clip_i_mean"]) == pytest.approx(cns + 1.0, abs=1e-6)
    assert float(rows["cns"]["single_clip_i_std"]) == pytest.approx(np.std([cns, cns + 2], ddof=1), abs=1e-6)
    assert float(rows["full_kv"]["single_clip_i_mean"]) == pytest.approx(final_mean(states["full_kv"].matrices["clip_i"]), abs=1e-6)
    assert rows["full_kv"]["single_clip_i_std"] == ""
    comp = {r["method"]: r for r in _csv(paths["table_comparison_csv"])}
    assert float(comp["full_kv"]["multi_clip_t_mean"]) == pytest.approx(states["full_kv"].multi["clip_t"], abs=1e-6)
    md = paths["table_comparison_md"].read_text()
    assert "| run | seeds (n) | CLIP-I single | CLIP-T single | CLIP-I multi | CLIP-T multi |" in md
    assert "| cns | 0, 1 (2) |" in md and "| full_kv | 0 (1) |" in md
    assert "mean over 2 samples" in md and " ± " in md
    assert "| CLIP-I | CLIP-T |" in paths["table_ablation_md"].read_text()


def test_concept1_curve_and_best_of(sweep, tmp_path):
    sweep_dir, states = sweep
    paths = aggregate(sweep_dir, tmp_path / "agg", best_of=True)
    curve = [r for r in _csv(paths["concept1_csv"]) if r["method"] == "full_kv"]
    assert [int(r["stage"]) for r in curve] == [1, 2]
    assert [float(r["clip_i_mean"]) for r in curve] == pytest.approx(states["full_kv"].matrices["clip_i_best"][:, 0].tolist())
    assert paths["concept1_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best of 2" in paths["table_ablation_md"].read_text()


def test_cli(sweep, tmp_path, capsys):
    sweep_dir, _ = sweep
    assert main([str(sweep_dir), "--out", str(tmp_path / "o")]) == 0
    assert "table_comparison_md" in capsys.readouterr().out and (tmp_path / "o" / "table_ablation.csv").exists()
    assert main([str(tmp_path / "empty")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "bad" / "run").mkdir(parents=True)
    (tmp_path / "bad" / "run" / "summary.json").write_text("{}")
    (tmp_path / "bad" / "run" / "eval").mkdir()
    (tmp_path / "bad" / "run" / "eval" / "state.json").write_text("{}")
    assert main([str(tmp_path / "bad")]) == 2
    assert "no 'method' field" in capsys.readouterr().err


def test_identity_column_and_learned_count(sweep, tmp_path):
    """Runs scored with an identity model (eval.dino_path) get an ID column and a learned count."""
    sweep_dir, _ = sweep
    run = tmp_path / "ids" / "cns" / "seed0"
    shutil.copytree(sweep_dir / "cns" / "seed0", run)
    st = json.loads((run / "eval" / "state.json").read_text())
    st["dino_model"] = "/x/identity"
    st["matrices"]["dino"] = [[40.0, None], [30.0, 20.0]]
    st["matrices"]["dino_best"] = [[45.0, None], [35.0, 25.0]]
    st["base"]["dino"] = {"teddy": 10.0, "mug": 10.0}
    st["base"]["reference"] = {"dino": {"teddy": 60.0, "mug": 60.0}}
    (run / "eval" / "state.json").write_text(json.dumps(st))
    paths = aggregate(tmp_path / "ids", tmp_path / "agg")
    row = _csv(paths["table_ablation_csv"])[0]
    assert float(row["single_dino_mean"]) == pytest.approx(25.0) and float(row["learned_mean"]) == 1.0
    md = paths["table_ablation_md"].read_text()
    assert "| ID single | concepts learned (of 2) |" in md and "| 25.00 | 1.00 |" in md


def test_a_knob_sweep_is_rows_not_seeds(sweep, tmp_path):
    """Runs that differ in a config knob (a lambda sweep) are separate rows, named by the knob; only
    seeds are averaged, with a 95% interval beside the mean."""
    sweep_dir, _ = sweep
    src = sweep_dir / "cns" / "seed0"
    for lam in (0.0, 10.0):
        for seed in (0, 1):
            run = tmp_path / "lam" / f"cns_l1_{lam}" / f"seed{seed}"
            shutil.copytree(src, run)
            (run / "summary.json").write_text(json.dumps({"method": "cns", "seed": seed, "concepts": ["teddy", "mug"]}))
            (run / "config.yaml").write_text(
                f"method:\n  name: cns\n  lambda1: {lam}\nseed: {seed}\ntag: _l1_{lam}\npaths:\n  run_dir: {run}\n"
            )
            st = json.loads((run / "eval" / "state.json").read_text())
            st["matrices"]["clip_i"] = [[None if v is None else v + lam + seed for v in row] for row in st["matrices"]["clip_i"]]
            (run / "eval" / "state.json").write_text(json.dumps(st))
    paths = aggregate(tmp_path / "lam", tmp_path / "agg")
    rows = {r["run"]: r for r in _csv(paths["table_ablation_csv"])}
    assert set(rows) == {"cns (method.lambda1=0.0)", "cns (method.lambda1=10.0)"}
    assert [rows[k]["n_seeds"] for k in sorted(rows)] == ["2", "2"]
    lo, hi = float(rows["cns (method.lambda1=0.0)"]["single_clip_i_mean"]), float(rows["cns (method.lambda1=10.0)"]["single_clip_i_mean"])
    assert hi - lo == pytest.approx(10.0)
    std = float(rows["cns (method.lambda1=0.0)"]["single_clip_i_std"])
    assert std == pytest.approx(np.std([0.0, 1.0], ddof=1)) and float(rows["cns (method.lambda1=0.0)"]["single_clip_i_ci95"]) == pytest.approx(12.706 * std / 2**0.5)
    md = paths["table_ablation_md"].read_text()
    assert "| cns (method.lambda1=10.0) | 0, 1 (2) |" in md and " ± 0.71 [" in md


def test_seeds_from_two_checkouts_and_from_before_a_knob_existed_are_one_setting(sweep, tmp_path):
    """Seeds run from two checkouts (the shipped evaluator at two absolute paths) and a folder made
    before a knob declared ``added`` with ``before`` (CNS's selection.weights) are one setting;
    a real difference of that knob still splits the rows."""
    sweep_dir, _ = sweep
    src = sweep_dir / "cns" / "seed0"
    variants = [  # (seed, checkout, selection.weights line)
        (0, "/work/main/src", ""), (1, "/opt/venv/lib/python3.11/site-packages", "    weights: current\n"),
        (2, "/opt/venv/lib/python3.11/site-packages", "    weights: base\n"),
    ]
    for seed, checkout, weights in variants:
        run = tmp_path / "two" / "cns" / f"seed{seed}"
        shutil.copytree(src, run)
        (run / "summary.json").write_text(json.dumps({"method": "cns", "seed": seed, "concepts": ["teddy", "mug"]}))
        (run / "config.yaml").write_text(
            f"method:\n  _target_: cns_lightning.methods.cns.CNS\n  name: cns\n  selection:\n    ratio: 0.3\n{weights}"
            f"eval:\n  clip_path: {checkout}/cns_lightning/assets/micro/clip\nseed: {seed}\n"
        )
    rows = {r["run"]: r["seeds"] for r in _csv(aggregate(tmp_path / "two", tmp_path / "agg")["table_ablation_csv"])}
    assert rows == {"cns (method.selection.weights=current)": "0 1", "cns (method.selection.weights=base)": "2"}
