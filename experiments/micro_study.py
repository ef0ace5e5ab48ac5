"""The micro-world study: does CNS personalize, forget less than its ablations, keep zero-shot ability?

Runs Hydra sweeps of the real CLI on the micro world (``+experiment=seq7``) and writes one table:

    python experiments/micro_study.py methods --seeds 0 --steps 200        # cns, no_reg, random_neurons, full_kv, textual_inversion
    python experiments/micro_study.py knobs --seeds 0 --steps 200          # threshold ratio, tokens in ||c||, lambda1/lambda2
    python experiments/micro_study.py table outputs/micro_study/methods    # re-tabulate finished runs

Per run (numbers from ``eval/results.json``, as ``evaluation.summary`` defines them; mean over samples):
  gain      mean over concepts of CLIP-I right after learning minus the base model's CLIP-I with the
            class prompt (no token): does the concept get learned?
  c1 drop   concept 1's CLIP-I after its own stage minus after the last stage (forgetting of the first)
  forget    mean over concepts of (best earlier CLIP-I - final CLIP-I)  (the usual forgetting measure)
  zs drift  zero-shot CLIP-T on plain held-out prompts, final minus base model (preservation)
  CLIP-I / CLIP-T  final model, single-concept prompts
  ID gain, learned  the identity model's gain, and how many concepts it calls learned
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["cns", "no_reg", "random_neurons", "full_kv", "textual_inversion"]
# (tag, overrides) for the knobs the paper leaves open; all with method=cns.
# The default (ratio 0.1, tokens no_bos, lambda 1/1) and lambda 0/0 (= no_reg) are in `methods`.
KNOBS = [
    ("_ratio0.05", ["method.selection.ratio=0.05"]),
    ("_ratio0.2", ["method.selection.ratio=0.2"]),
    ("_tok_all", ["method.selection.tokens=all"]),
    ("_l1_10_l2_10", ["method.lambda1=10", "method.lambda2=10"]),
]


def run_sweep(name: str, overrides: list[str], out_root: Path) -> None:
    cmd = [sys.executable, "-m", "cns_lightning", "-m", "+experiment=seq7", f"name={name}",
           "trainer.enable_progress_bar=false", *overrides]
    env = dict(os.environ, CNS_OUTPUT=str(out_root))
    print("$", " ".join(cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    print(f"  done in {time.time() - t:.0f} s", flush=True)


def metrics(run: Path) -> dict:
    """The run's headline numbers as the package defines them (``evaluation.summary.results_from_state``)."""
    r = json.loads((run / "eval" / "results.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    return dict(
        gain=r["gain_over_base"]["clip_i"],
        c1_drop=r["concept1_drop"]["clip_i"],
        forget=r["forgetting"]["clip_i"]["forgetting"],
        zs_drift=r["zero_shot_clip_t"]["mean"]["drift"],
        clip_i=r["single"]["clip_i"],
        clip_t=r["single"]["clip_t"],
        id_gain=r["gain_over_base"].get("dino", float("nan")),
        learned=r.get("learned", {}).get("learned", float("nan")),
        entries=statistics.mean(s.get("concept_entries", 0) for s in summary["stages"]),
    )


def table(sweep_dir: Path) -> str:
    rows: dict[str, list[dict]] = {}
    for results in sorted(sweep_dir.glob("*/seed*/eval/results.json")):
        run = results.parents[1]
        rows.setdefault(run.parent.name, []).append(metrics(run))
    cols = ["gain", "c1_drop", "forget", "zs_drift", "clip_i", "clip_t", "id_gain", "learned", "entries"]
    lines = [
        f"Micro-world study: {sweep_dir} (micro CLIP, mean over samples; ± = std over seeds)",
        "",
        "| run | seeds | CLIP-I gain | concept-1 drop | forgetting | zero-shot drift | CLIP-I | CLIP-T | ID gain | concepts learned (ID) | neurons/concept |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, ms in rows.items():
        cells = []
        for c in cols:
            vals = [m[c] for m in ms]
            mean = statistics.mean(vals)
            cells.append(f"{mean:.0f}" if c == "entries" else (f"{mean:.2f} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{mean:.2f}"))
        lines.append(f"| {name} | {len(ms)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["methods", "knobs", "table"])
    p.add_argument("sweep_dir", nargs="?", help="for `table`: a sweep folder (.../multirun)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=str(ROOT / "outputs" / "micro_study"))
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    a = p.parse_args(argv)
    out_root = Path(a.out)
    common = [f"seed={a.seeds}", f"method.steps={a.steps}", *a.extra]
    if a.what == "table":
        print(table(Path(a.sweep_dir)))
        return
    if a.what == "methods":
        run_sweep("methods", ["method=" + ",".join(METHODS), *common], out_root)
        sweep = out_root / "methods" / "multirun"
    else:
        for tag, overrides in KNOBS:
            run_sweep("knobs", ["method=cns", f"tag={tag}", *overrides, *common], out_root)
        sweep = out_root / "knobs" / "multirun"
    text = table(sweep)
    (sweep / "study.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
