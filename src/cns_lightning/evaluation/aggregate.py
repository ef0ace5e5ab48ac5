"""Aggregate a sweep: ``python -m cns_lightning.evaluation.aggregate <sweep_dir> [--out DIR] [--best-of]``.

Reads every run folder below ``sweep_dir`` (a folder with ``summary.json`` from the training loop,
at least ``{"method": .., "seed": .., "concepts": [..]}``, and ``eval/state.json`` from the
evaluator), averages over seeds (mean ± std when several) and writes to ``--out`` (default
``<sweep_dir>/aggregate``):

* ``concept1_clip_i.png`` / ``.csv``: CLIP-I of the first concept against stage, every method
  (the paper's Fig. 5: how much of concept 1 survives the later concepts);
* ``table_ablation.md`` / ``.csv``: Table 2 layout (method, CLIP-I, CLIP-T; single concept);
* ``table_comparison.md`` / ``.csv``: Table 1 layout (single and multi-concept CLIP-I / CLIP-T,
  fusion memory and time when the runs' summaries report them).

Numbers are those of the final model (after the last evaluated stage), mean over samples, or
best-of-N with ``--best-of`` (the paper's protocol).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .state import EvalState, StateError, atomic_write_text
from .summary import results_from_state


class SweepError(ValueError):
    """The sweep folder cannot be aggregated; the message names the file and the fix."""


@dataclass
class RunResult:
    path: Path
    method: str
    seed: int
    summary: dict[str, Any]
    state: EvalState
    results: dict[str, Any]
    config: dict[str, Any] | None = None  # the run's resolved config.yaml, flattened (None: no config.yaml)


# Config keys that do not define what a run measures: runs differing only in these (and the seed)
# are seeds of one setting. Everything else that differs between runs separates their rows.
NOT_DEFINING = ("seed", "tag", "name", "device", "resume", "nan_check_every", "paths.", "hydra.", "logger.",
                "data.num_workers", "prior.batch_size", "eval.batch_size", "trainer.enable_progress_bar")
# Two-sided 95% Student t quantiles for 1..30 degrees of freedom (then the normal 1.96).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def ci95(std: float, n: int) -> float:
    """Half-width of the 95% confidence interval of a mean of ``n`` seeds (Student t)."""
    if n < 2 or math.isnan(std):
        return math.nan
    return (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * std / math.sqrt(n)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(d, sort_keys=True) if isinstance(d, list) else d}


def _read_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        return _flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML ({e}); rerun the job or delete the folder") from e


def load_run(folder: Path) -> RunResult:
    """One run folder (``summary.json`` + ``eval/state.json``)."""
    sp = folder / "summary.json"
    try:
        summary = json.loads(sp.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SweepError(f"{sp}: cannot read ({e}); rerun the job or delete the folder") from e
    for key in ("method", "seed"):
        if key not in summary:
            raise SweepError(f"{sp}: no {key!r} field; the training loop writes {{'method': .., 'seed': .., 'concepts': [..]}}")
    try:
        state = EvalState.load(folder / "eval" / "state.json")
    except StateError as e:
        raise SweepError(str(e)) from e
    return RunResult(folder, str(summary["method"]), int(summary["seed"]), summary, state, results_from_state(state), _read_config(folder))


def find_runs(sweep_dir: Path) -> list[RunResult]:
    """Every folder below ``sweep_dir`` holding both summary.json and eval/state.json."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepError(f"{sweep_dir}: not a folder; pass the sweep's output folder (e.g. outputs/<name>/multirun)")
    runs = [load_run(p.parent) for p in sorted(sweep_dir.rglob("summary.json")) if (p.parent / "eval" / "state.json").exists()]
    if not runs:
        raise SweepError(
            f"{sweep_dir}: no run folder with summary.json and eval/state.json below it; were the runs evaluated (eval.enabled=true)?"
        )
    return runs


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan, 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan, len(vals)


def _fmt(m: float, s: float, n: int = 0) -> str:
    """``mean ± std [95% CI]`` over seeds; the mean alone for one seed."""
    if math.isnan(m):
        return "—"
    if math.isnan(s):
        return f"{m:.2f}"
    h = ci95(s, n)
    return f"{m:.2f} ± {s:.2f}" + (f" [{m - h:.2f}, {m + h:.2f}]" if not math.isnan(h) else "")


def _defining(key: str) -> bool:
    return not any(key == p or (p.endswith(".") and key.startswith(p)) for p in NOT_DEFINING)


def _setting_value(value: Any) -> Any:
    """A config value as a setting: a path into a ``cns_lightning/assets`` folder (the shipped micro
    models, from whichever checkout or install ran it) names the shipped file, not the folder it
    was installed in."""
    if isinstance(value, str) and "/cns_lightning/assets/" in value.replace("\\", "/"):
        return "<cns_lightning assets>/" + value.replace("\\", "/").split("/cns_lightning/assets/", 1)[1]
    return value


def _setting(config: dict[str, Any] | None) -> dict[str, Any]:
    """A run's config as a setting: knobs declared ``added`` with a ``before`` value that its folder
    predates count as that value (the code it ran with had no other), asset paths as ``_setting_value``."""
    cfg = {k: _setting_value(v) for k, v in (config or {}).items()}
    if "method._target_" in cfg:
        from ..knobs import knobs_of
        from ..methods import MethodConfigError

        try:
            knobs = knobs_of({"method": {"_target_": cfg["method._target_"]}})
        except MethodConfigError:
            knobs = ()
        for knob in knobs:
            if knob.added and knob.before is not None and knob.key not in cfg:
                cfg[knob.key] = knob.before
    return cfg


def by_setting(runs: list[RunResult]) -> dict[str, list[RunResult]]:
    """Runs grouped by everything that defines them but the seed: the method, and every config key
    (``config.yaml``) whose value differs between runs, named in the row label
    (``cns (method.lambda1=10.0)``), so a sweep over a knob is never averaged as if it were seeds.
    Values are compared as settings (``_setting``)."""
    settings = {id(r): _setting(r.config) for r in runs}
    keys = sorted({k for r in runs for k in settings[id(r)] if _defining(k)})
    varying = [k for k in keys if k != "method.name" and len({json.dumps(settings[id(r)].get(k), default=str) for r in runs}) > 1]
    out: dict[str, list[RunResult]] = {}
    for r in sorted(runs, key=lambda r: (r.method, [str(settings[id(r)].get(k)) for k in varying], r.seed)):
        cfg = settings[id(r)]
        diff = ", ".join(f"{k}={cfg.get(k)}" for k in varying if cfg.get(k) is not None)
        out.setdefault(f"{r.method} ({diff})" if diff else r.method, []).append(r)
    return out


def _metric(r: RunResult, where: str, key: str) -> float:
    v = r.results.get(where, {}).get(key)
    return math.nan if v is None else float(v)


def _fusion(r: RunResult, key: str) -> float:
    v = (r.summary.get("fusion") or {}).get(key)
    return math.nan if v is None else float(v)


COLUMNS = {
    "ablation": [("CLIP-I", "single", "clip_i"), ("CLIP-T", "single", "clip_t")],
    "comparison": [
        ("CLIP-I single", "single", "clip_i"),
        ("CLIP-T single", "single", "clip_t"),
        ("CLIP-I multi", "multi", "clip_i"),
        ("CLIP-T multi", "multi", "clip_t"),
    ],
}
FUSION = [("fusion memory GPU (MB)", "memory_mb_gpu"), ("fusion memory CPU (MB)", "memory_mb_cpu"), ("fusion time (s)", "time_s")]
# With an identity model (eval.dino_path; the micro world's ID): its single-concept score and the
# number of concepts learned by the rule of evaluation.metrics.learned, beside CLIP-I / CLIP-T.
IDENTITY_COLUMNS = [("ID single", "single", "dino")]


def _learned(r: RunResult) -> float:
    lv = r.results.get("learned") or {}
    return float(lv["learned"]) if lv.get("of") and lv.get("metric") == "dino" else math.nan


def table(groups: dict[str, list[RunResult]], layout: str, best_of: bool) -> tuple[list[str], list[list[str]], list[dict[str, Any]]]:
    """(markdown header, markdown rows, csv rows) of one table layout."""
    suffix = "_best" if best_of else ""
    identity = any("dino" in r.state.matrices for rs in groups.values() for r in rs)
    cols = COLUMNS[layout] + (IDENTITY_COLUMNS if identity else [])
    fusion = layout == "comparison" and any(r.summary.get("fusion") for rs in groups.values() for r in rs)
    n_concepts = "/".join(str(n) for n in sorted({r.state.n for rs in groups.values() for r in rs}))
    header = ["run", "seeds (n)"] + [c[0] for c in cols] + ([f"concepts learned (of {n_concepts})"] if identity else []) + ([f[0] for f in FUSION] if fusion else [])
    md_rows, csv_rows = [], []
    for label, rs in groups.items():
        row_md = [label, f"{', '.join(str(r.seed) for r in rs)} ({len(rs)})"]
        row_csv: dict[str, Any] = {"method": rs[0].method, "run": label, "n_seeds": len(rs), "seeds": " ".join(str(r.seed) for r in rs)}

        def add(name: str, values: list[float]) -> None:
            m, s, n = _mean_std(values)
            row_md.append(_fmt(m, s, n))
            row_csv[f"{name}_mean"], row_csv[f"{name}_std"], row_csv[f"{name}_ci95"] = m, s, ci95(s, n)

        for _, where, key in cols:
            add(f"{where}_{key}{suffix}", [_metric(r, where, key + suffix) for r in rs])
        if identity:
            add("learned", [_learned(r) for r in rs])
        if fusion:
            for _, key in FUSION:
                add(f"fusion_{key}", [_fusion(r, key) for r in rs])
        md_rows.append(row_md)
        csv_rows.append(row_csv)
    return header, md_rows, csv_rows


def concept1_curves(groups: dict[str, list[RunResult]], best_of: bool) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Per method: (mean, std, n) over seeds of R[t, concept 1] for stages t = 1..T."""
    key = "clip_i_best" if best_of else "clip_i"
    out = {}
    for method, rs in groups.items():
        T = max(r.state.n for r in rs)
        curves = np.full((len(rs), T), np.nan)
        for k, r in enumerate(rs):
            curves[k, : r.state.n] = r.state.matrices[key][:, 0]
        n = np.sum(~np.isnan(curves), axis=0)
        with np.errstate(all="ignore"):
            mean = np.nanmean(curves, axis=0) if np.any(n) else curves[0]
            std = np.nanstd(curves, axis=0, ddof=1) if len(rs) > 1 else np.full(T, np.nan)
        out[method] = (mean, std, len(rs))
    return out


def plot_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, int]], path: Path, label: str) -> Path:
    from .report import _figure, _save

    fig = _figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    for method, (mean, std, n) in curves.items():
        xs = np.arange(1, len(mean) + 1)
        ax.plot(xs, mean, marker="o", label=f"{method} (n={n})")
        if n > 1:
            ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("stage (concepts learned)")
    ax.set_ylabel(f"CLIP-I of concept 1 ({label})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import io

    buf = io.StringIO()
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def _md(header: list[str], rows: list[list[str]]) -> str:
    return "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" + "".join("| " + " | ".join(r) + " |\n" for r in rows)


def aggregate(sweep_dir: Path, out: Path | None = None, best_of: bool = False) -> dict[str, Path]:
    """Write the figure and both tables; returns their paths by name."""
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out else sweep_dir / "aggregate"
    runs = find_runs(sweep_dir)
    groups = by_setting(runs)
    n_samples = "/".join(str(n) for n in sorted({r.state.settings.get("n_samples") for r in runs}, key=str))
    clip_models = sorted({str(_setting_value(r.state.clip_model)) for r in runs})
    label = f"best of {n_samples} samples per prompt" if best_of else f"mean over {n_samples} samples per prompt"
    note = (
        f"{len(runs)} runs below `{sweep_dir}`; final model (after the last evaluated stage); {label}; "
        f"CLIP: {', '.join(clip_models)}; mean ± std (ddof 1) [95% confidence interval, Student t] over seeds; "
        "a row per setting (the method and every differing config key but the seed). Written by "
        f"`python -m cns_lightning.evaluation.aggregate {sweep_dir}{' --best-of' if best_of else ''}`.\n\n"
    )
    paths: dict[str, Path] = {}
    for layout, title in (("ablation", "Ablation (Table 2 layout)"), ("comparison", "Comparison (Table 1 layout)")):
        header, md_rows, csv_rows = table(groups, layout, best_of)
        paths[f"table_{layout}_md"] = out / f"table_{layout}.md"
        atomic_write_text(paths[f"table_{layout}_md"], f"# {title}\n\n{note}{_md(header, md_rows)}")
        paths[f"table_{layout}_csv"] = out / f"table_{layout}.csv"
        _write_csv(paths[f"table_{layout}_csv"], csv_rows)
    curves = concept1_curves(groups, best_of)
    paths["concept1_png"] = plot_curves(curves, out / "concept1_clip_i.png", label)
    rows = []
    for method, (mean, std, n) in curves.items():
        for t, (m, s) in enumerate(zip(mean, std), 1):
            rows.append({"method": method, "stage": t, "clip_i_mean": float(m), "clip_i_std": float(s), "n_seeds": n})
    paths["concept1_csv"] = out / "concept1_clip_i.csv"
    _write_csv(paths["concept1_csv"], rows)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cns_lightning.evaluation.aggregate", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", type=Path, help="folder holding the run folders (searched recursively)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: <sweep_dir>/aggregate)")
    ap.add_argument("--best-of", action="store_true", help="use best-of-N numbers (the paper's protocol) instead of the mean")
    args = ap.parse_args(argv)
    try:
        paths = aggregate(args.sweep_dir, args.out, args.best_of)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, p in paths.items():
        print(f"{name}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
