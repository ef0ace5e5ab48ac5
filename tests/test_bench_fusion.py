"""experiments/bench_fusion.py: one real CLI run per method; the table names the device and shows
the merge cost the loop measured and wrote into the run's summary.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from bench_fusion import main  # noqa: E402


def test_the_table_names_the_device_and_each_methods_merge_cost(tmp_path, capsys):
    results = main(["--model", "tiny", "--concepts", "2", "--steps", "1", "--methods", "custom_diffusion", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert printed.startswith("device: CPU") and "model=tiny, 2 concepts" in printed
    (row,) = [line for line in printed.splitlines() if line.startswith("| custom_diffusion |")]
    (r,) = results
    assert r["fusion"]["stages"] == 2 and r["fusion"]["time_s"] > 0 and r["fusion"]["max_cpu_peak_bytes"] is not None
    assert f"| {r['fusion']['time_s']:.3f} |" in row
    (saved,) = tmp_path.glob("*/results.json")
    assert json.loads(saved.read_text())["results"][0]["fusion"] == r["fusion"]
