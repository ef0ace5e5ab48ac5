"""experiments/bench_study.py on the CPU with model=tiny: every part runs and its table names the device."""

from __future__ import annotations

import json
import pytest
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import bench_study  # noqa: E402

SMOKE = ["model=tiny", "trainer=cpu", "--images", "4", "--steps", "2", "--table1-images", "4", "--train-steps", "4", "--warmup", "1"]


def test_sampler_evaluation_and_protocol_parts_print_a_table_naming_the_device(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # restored after the test
    monkeypatch.setattr(sys, "argv", ["bench_study.py", *SMOKE, "--parts", "a,b,c", "--out", str(tmp_path / "out")])
    bench_study.main()
    table = capsys.readouterr().out
    r = json.loads((tmp_path / "out" / "bench_study.json").read_text())
    assert r["device"].startswith("CPU") and f"bench_study on {r['device']}" in table
    a, (b,), c = r["a"], r["b"], r["c"]  # (b): one row per --eval-batches, the config's batch by default
    assert a["images"] == a["eval_images"] == 4 and a["prior_img_s"] > 0 and a["eval_img_s"] > 0
    assert a["precision"] == "fp32"  # a CPU samples in fp32
    assert b["sampler"] == "shared with (a)" and b["stage1_s"] > 0 and b["stage7_images"] > b["stage1_images"] > 0
    assert b["batch"] == 8 and b["stage7_no_report_s"] > 0
    assert (tmp_path / "out" / "eval_run_b8" / "eval" / "state.json").is_file()  # the loop's evaluation really ran
    # seconds is rounded to 0.01 s (a CPU smoke takes ~0.1 s): the projection within that rounding
    assert c["images"] == 4 and c["projected_2100_s"] == pytest.approx(c["seconds"] / 4 * 2100, abs=0.005 / 4 * 2100 + 0.1)
    for row in ("(a) prior images", "(a) evaluation images", "(b) evaluation after stage 1", "(c) Table-1 protocol"):
        assert row in table


def test_a_training_child_reports_its_first_step_compile_and_step_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(sys, "argv", ["bench_study.py", *SMOKE, "--child-train", "regional", "--out", str(tmp_path / "out")])
    bench_study.main()
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("CHILD "))
    row = json.loads(line[len("CHILD "):])
    assert row["variant"] == "regional" and row["steps"] == 4
    assert row["first_step_s"] > 0 and row["step_ms"] > 0 and row["compile_s"] == 0  # trainer=cpu: nothing compiled
    assert row["inductor_cache"] == str(tmp_path / "inductor")
