"""The cost of a merge step as the loop measures it (``fusion_cost``): extra peak CPU memory and
wall time of one step, and a sequence's totals in the layout ``evaluation.aggregate`` tabulates."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest

from cns_lightning import continual
from cns_lightning.fusion_cost import measure, sequence_totals
from cns_lightning.methods import TextualInversion
from cns_lightning.state import read_stage
from conftest import FAST, compose_cfg, concepts_override, make_concept_folder

MIB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU peak is read from /proc (Linux)")
def test_a_step_that_holds_64_mib_for_a_moment_shows_that_peak_and_a_noop_does_not():
    def hold():
        a = np.ones(64 * MIB, dtype=np.uint8)  # touched: resident
        return int(a[::4096].sum())

    result, cost = measure(hold, "cpu")
    assert result == 64 * MIB // 4096
    assert 56 * MIB <= cost["merge_cpu_peak_bytes"] <= 96 * MIB, cost  # freed on return: only the peak sees it
    _, idle = measure(lambda: None, "cpu")
    assert idle["merge_cpu_peak_bytes"] < 8 * MIB, idle
    assert "merge_cuda_peak_bytes" not in idle and idle["merge_seconds"] >= 0


def test_sequence_totals_sum_the_time_and_keep_the_largest_peak():
    stages = [
        dict(stage=1, merge_seconds=0.5, merge_cpu_peak_bytes=3 * MIB, merge_cuda_peak_bytes=10 * MIB),
        dict(stage=2, merge_seconds=1.25, merge_cpu_peak_bytes=2 * MIB, merge_cuda_peak_bytes=30 * MIB),
    ]
    t = sequence_totals(stages)
    assert t["time_s"] == 1.75 and t["memory_mb_cpu"] == 3.0 and t["memory_mb_gpu"] == 30.0 and t["stages"] == 2
    assert t["last_stage"] == dict(stage=2, seconds=1.25, cpu_peak_bytes=2 * MIB, cuda_peak_bytes=30 * MIB)
    cpu_only = sequence_totals([dict(stage=1, merge_seconds=0.1, merge_cpu_peak_bytes=None)])
    assert cpu_only["memory_mb_gpu"] is None and cpu_only["memory_mb_cpu"] is None
    assert sequence_totals([dict(stage=1)]) == {}


class HeavyMerge(TextualInversion):
    """A method whose merge step holds 64 MiB for a moment and takes at least 0.2 s (any Method's
    merge is measured through the interface, whatever it does)."""

    def merge(self, ctx, m):
        a = np.ones(64 * MIB, dtype=np.uint8)
        time.sleep(0.2)
        return int(a[::4096].sum())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU peak is read from /proc (Linux)")
def test_the_loop_measures_any_methods_merge_into_stage_json_and_the_summary(tmp_path):
    dirs = [make_concept_folder(tmp_path / "data" / "teddy", n=3)]
    cfg = compose_cfg(tmp_path, [concepts_override(dirs), "method=textual_inversion", f"method._target_={__name__}.HeavyMerge",
                                 *FAST, "~logger", "calibration.num_prompts=4"])
    result = continual.run(cfg)
    (stage,) = result["stages"]
    assert stage["merge_seconds"] >= 0.2 and 56 * MIB <= stage["merge_cpu_peak_bytes"] <= 96 * MIB, stage
    saved = read_stage(next((tmp_path / "run" / "stages").iterdir())).info
    assert {k: saved[k] for k in ("merge_seconds", "merge_cpu_peak_bytes")} == {k: stage[k] for k in ("merge_seconds", "merge_cpu_peak_bytes")}
    fusion = json.loads((tmp_path / "run" / "summary.json").read_text())["fusion"]
    assert fusion["time_s"] == stage["merge_seconds"] and fusion["memory_mb_cpu"] == round(stage["merge_cpu_peak_bytes"] / MIB, 1)
    assert fusion["memory_mb_gpu"] is None  # a CPU run measures no GPU memory
