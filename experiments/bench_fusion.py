"""The fusion cost of every method for a sequence of concepts, as Table 1 of Liao et al. (ICCV 2025)
reports it (extra memory and time of the merge step), measured by the continual loop itself.

    python experiments/bench_fusion.py [--model micro] [--concepts 7] [--steps 2] [--methods cns custom_diffusion ...]
    python experiments/bench_fusion.py --model sd15_random --device cuda       # one H200

For each method one run of the real CLI (``python -m cns_lightning``, a process of its own) on the
first ``--concepts`` micro-world concepts of ``+experiment=seq7``, ``--steps`` training steps per
stage (the merge's cost does not depend on how long a concept trained), no prior images, no
evaluation. The loop measures each stage's merge step (``fusion_cost.measure``: wall time, extra
peak CPU resident memory, extra peak ``torch.cuda.max_memory_allocated``) into ``summary.json``;
this script prints them as a table naming the device and writes ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "experiments"))  # bench_gpu.seq_concepts for models above 64 px

from omegaconf import OmegaConf  # noqa: E402

from cns_lightning.methods import METHODS  # noqa: E402

MIB = 2**20


def seq7_concepts() -> list[str]:
    return [str(c["name"]) for c in OmegaConf.load(ROOT / "src" / "cns_lightning" / "conf" / "experiment" / "seq7.yaml").data.concepts]


def device_name(device: str) -> str:
    """The machine the runs use, in words (GPU name, or the CPU model and the thread count)."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model}, {os.environ.get('OMP_NUM_THREADS', os.cpu_count())} threads (torch {torch.__version__})"


def run_method(method: str, args, out: Path) -> dict:
    """One run of the CLI; its summary.json's stages and fusion totals, and the run's wall time."""
    names = seq7_concepts()[: args.concepts]
    res = int(OmegaConf.load(ROOT / "src" / "cns_lightning" / "conf" / "model" / f"{args.model}.yaml").get("resolution", 64))
    if res > 64:  # the world renders 64 px: a larger model gets the same images upscaled (bench_gpu.seq_concepts)
        from bench_gpu import seq_concepts

        items = [f"{{name:{c.name},class_name:'{c.class_name}',category:{c.category},path:'{c.path}'}}"
                 for c in seq_concepts(names, out / "cache", res)]
    else:
        items = [f"{{name:{n},source:microworld}}" for n in names]
    concepts = "data.concepts=[" + ",".join(items) + "]"
    run_dir = out / method
    cmd = [
        sys.executable, "-m", "cns_lightning", "+experiment=seq7", f"model={args.model}", f"method={method}", concepts,
        f"method.steps={args.steps}", "prior.enabled=false", "eval=off", "logger=none", "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}", f"device={args.device}", *(["trainer.accelerator=gpu", "trainer.precision=bf16-mixed"] if args.device.startswith("cuda") else []),
        *args.override,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"error: method {method} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return dict(method=method, wall_s=round(wall, 1), stages=summary["stages"], fusion=summary["fusion"])


def _mib(v) -> str:
    return "n/a" if v is None else f"{v / MIB:.1f}"


def table(results: list[dict], device: str, args) -> str:
    lines = [
        f"device: {device}; model={args.model}, {args.concepts} concepts, {args.steps} steps per stage",
        "",
        f"| method | merge time, all {args.concepts} stages (s) | merge of all {args.concepts} concepts, last stage (s) | extra CPU peak, max over stages (MiB) | extra GPU peak, max over stages (MiB) | whole run (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        f = r["fusion"]
        lines.append(f"| {r['method']} | {f['time_s']:.3f} | {f['last_stage']['seconds']:.3f} | {_mib(f['max_cpu_peak_bytes'])} | {_mib(f['max_cuda_peak_bytes'])} | {r['wall_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="micro", help="model config: micro (CPU), sd15_random (GPU), tiny (tests)")
    ap.add_argument("--methods", nargs="+", default=sorted(METHODS), help=f"registered methods (default: all: {', '.join(sorted(METHODS))})")
    ap.add_argument("--concepts", type=int, default=7, help="first N concepts of +experiment=seq7 (default 7, Table 1's count)")
    ap.add_argument("--steps", type=int, default=2, help="training steps per stage (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_fusion", help="its runs go to a new <out>/<date-time>/ (run folders, results.json)")
    ap.add_argument("--override", nargs="*", default=[], help="more Hydra overrides for every run")
    args = ap.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not 1 <= args.concepts <= len(seq7_concepts()) or args.steps < 1:
        ap.error(f"--methods must be among {', '.join(sorted(METHODS))} (got {unknown}); --concepts 1..{len(seq7_concepts())}; --steps >= 1")
    args.out = args.out / time.strftime("%Y%m%d-%H%M%S")  # fresh run folders: an old one would resume, not merge
    args.out.mkdir(parents=True, exist_ok=False)
    device = device_name(args.device)
    results = [run_method(m, args, args.out) for m in args.methods]
    (args.out / "results.json").write_text(json.dumps(dict(device=device, argv=sys.argv[1:] if argv is None else argv, results=results), indent=2) + "\n")
    print(table(results, device, args))
    return results


if __name__ == "__main__":
    main()
