"""The cost of a merge step as the loop measures it (``fusion_cost``): extra peak CPU memory and
wall time of one step, and a sequence's totals in the layout ``evaluation.aggregate`` tabulates."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from cns_lightning.fusion_cost import measure, sequence_totals

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
