"""``run_dir/report.md`` with tables and PNG figures (``run_dir/eval/figures/``).

Written after every evaluated stage (so an interrupted run still has a report) and by
``ContinualEvaluator.finish``. Everything comes from ``eval/state.json``, the sample thumbnails
under ``eval/samples/`` and, when the loop wrote them, the selection statistics
``stage_XX_<name>/selection.json`` (or ``selection/*.json``).

Figures use matplotlib's object API with the Agg canvas: no pyplot, no global backend switch.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .forgetting import last_stage
from .state import EvalState, atomic_write_text
from .summary import results_from_state


# ----------------------------------------------------------------------------- figures
def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")  # keeps a legend placed outside the axes in the image
    return path


def plot_matrix(R: np.ndarray, names: list[str], title: str, path: Path) -> Path:
    """Heat map of a forgetting matrix (rows: after stage t; columns: concept i), values written in."""
    T = R.shape[0]
    fig = _figure(1.2 + 0.7 * T, 1.0 + 0.6 * T)
    ax = fig.add_subplot(1, 1, 1)
    masked = np.ma.masked_invalid(R)
    im = ax.imshow(masked, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax)
    for t in range(T):
        for i in range(T):
            if not math.isnan(R[t, i]):
                ax.text(i, t, f"{R[t, i]:.1f}", ha="center", va="center", color="w", fontsize=7)
    ax.set_xticks(range(T), [f"{i + 1}:{n}" for i, n in enumerate(names)], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(T), [f"after {t + 1}" for t in range(T)], fontsize=7)
    ax.set_xlabel("concept i")
    ax.set_ylabel("stage t")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def metric_label(key: str, state: EvalState) -> str:
    """Display name of a metric key; ``dino`` is "DINO" for a DINO model and "ID" for another
    identity embedding (the micro world's identity model)."""
    if key.startswith("dino"):
        name = "DINO" if "dino" in str(state.dino_model or "").lower() else "ID"
        return name + key[len("dino"):].replace("_", "-")
    return key.replace("_", "-").upper()


def _keys(state: EvalState) -> list[str]:
    return [k for k in ("clip_i", "clip_t", "dino") if k in state.matrices]


def plot_curves(state: EvalState, path: Path) -> Path:
    """Per-concept CLIP-I, CLIP-T (and identity) against stage (base model at stage 0), zero-shot CLIP-T too."""
    return _save(curves_figure(state), path)


def curves_figure(state: EvalState):
    """The figure of :func:`plot_curves`; one legend, to the right of the last panel (it covers no curve)."""
    keys = _keys(state)
    fig = _figure(5 * len(keys), 3.8)
    T = state.n
    for p, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), p + 1)
        R = state.matrices[key]
        for i, n in enumerate(state.concepts):
            xs = list(range(i + 1, T + 1))
            ys = R[i:, i]
            line = ax.plot(xs, ys, marker="o", ms=3, label=f"{i + 1}:{n}")[0]
            base = state.base.get(key, {}).get(n)
            if base is not None:
                ax.plot([0], [base], marker="x", color=line.get_color())
        if key == "clip_t":
            zs = state.zero_shot.get("mean", [])
            ax.plot(range(len(zs)), zs, "k--", label="zero-shot (no concept)")
        ax.set_xlabel("stage (0 = base model, x = class prompt)")
        ax.set_ylabel(metric_label(key, state) + " (mean over samples)")
        ax.set_xticks(range(0, T + 1))
        ax.grid(alpha=0.3)
    handles, labels = fig.axes[min(1, len(fig.axes) - 1)].get_legend_handles_labels()  # the CLIP-T panel has the zero-shot line too
    fig.axes[-1].legend(handles, labels, fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return fig


def _label(draw: ImageDraw.ImageDraw, xy, text: str) -> None:
    draw.text(xy, text, fill=(0, 0, 0))


def sample_grid(run_dir: Path, state: EvalState, upto: int | None = None) -> Image.Image | None:
    """Rows = concepts (+ zero-shot), columns = stages 0..T; each cell the first sample of prompt 0."""
    run_dir = Path(run_dir)
    stages = sorted(int(s) for s in state.samples if upto is None or int(s) <= upto)
    if not stages:
        return None
    rows = list(state.concepts) + ["zero_shot"]
    cells: dict[tuple[int, int], Image.Image] = {}
    size = 16
    refs = run_dir / "eval" / "samples" / "references"
    for r, name in enumerate(rows):  # column 0: the concept's first reference image
        if (refs / f"{name}.png").exists():
            with Image.open(refs / f"{name}.png") as im:
                cells[r, 0] = im.convert("RGB")
            size = max(size, *cells[r, 0].size)
    for c, s in enumerate(stages, 1):
        for r, name in enumerate(rows):
            files = state.samples[str(s)].get(name)
            if files and (run_dir / files[0]).exists():
                with Image.open(run_dir / files[0]) as im:
                    cells[r, c] = im.convert("RGB")
                size = max(size, *cells[r, c].size)
    left, top = 110, 18
    grid = Image.new("RGB", (left + size * (len(stages) + 1), top + size * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    _label(draw, (left + 2, 2), "reference")
    for c, s in enumerate(stages, 1):
        _label(draw, (left + c * size + 2, 2), "base" if s == 0 else f"t={s}")
    for r, name in enumerate(rows):
        _label(draw, (2, top + r * size + size // 2 - 5), name[:16])
    for (r, c), im in cells.items():
        grid.paste(im, (left + c * size, top + r * size))
    return grid


# ----------------------------------------------------------------------------- selection stats
def read_selection_stats(run_dir: Path) -> list[tuple[int, str, dict[str, Any]]]:
    """(stage, concept, stats) from the loop's selection statistics; [] if there are none.

    Read from ``stages/XX_<name>/selection.json`` (the loop's stage folders),
    ``stage_XX_<name>/selection.json`` or ``selection/stage_XX_<name>.json``.
    """
    run_dir = Path(run_dir)
    found = []
    paths = (
        sorted(run_dir.glob("stages/*/selection.json"))
        + sorted(run_dir.glob("stage_*/selection.json"))
        + sorted((run_dir / "selection").glob("*.json"))
    )
    for p in paths:
        label = p.parent.name if p.name == "selection.json" else p.stem
        m = re.match(r"(?:stage_)?(\d+)_?(.*)", label)
        stage, name = (int(m.group(1)), m.group(2) or label) if m else (len(found) + 1, label)
        try:
            stats = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: cannot read the selection statistics ({e}); fix or delete the file") from e
        if not isinstance(stats, dict) or "layers" not in stats:
            raise ValueError(f"{p}: expected {{'layers': {{name: {{...}}}}, 'total': {{...}}}}; fix or delete the file")
        found.append((stage, name, stats))
    return sorted(found, key=lambda x: x[0])


def plot_selection(stats: list[tuple[int, str, dict[str, Any]]], path: Path) -> Path:
    """Concept-neuron density per layer, one line per stage (layers of the last stage's statistics)."""
    return _save(selection_figure(stats), path)


def selection_figure(stats: list[tuple[int, str, dict[str, Any]]]):
    """The figure of :func:`plot_selection`: layers labelled by :func:`layer_label`, the legend
    to the right of the axes."""
    layers = list(stats[-1][2]["layers"])
    fig = _figure(max(6, 0.25 * len(layers) + 2), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for stage, name, st in stats:
        ys = [st["layers"].get(layer, {}).get("concept_density", math.nan) for layer in layers]
        ax.plot(range(len(layers)), ys, marker=".", label=f"stage {stage}: {name}")
    ax.set_xticks(range(len(layers)), [layer_label(layer) for layer in layers], rotation=90, fontsize=7)
    ax.set_xlabel("cross-attention layer (UNet block, attention, K or V)")
    ax.set_ylabel("concept-neuron density")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.grid(alpha=0.3)
    return fig


_LAYER = re.compile(r"(down_blocks|up_blocks|mid_block)\.?(\d*)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2\.to_([kv])(?:\.weight)?$")


def layer_label(layer: str) -> str:
    """A UNet cross-attention weight's name as a short readable label: ``down_blocks.1.attentions.0.
    transformer_blocks.0.attn2.to_k.weight`` -> ``down 1.0 K``, ``mid_block...to_v`` -> ``mid 0 V``
    (a transformer block index other than 0 is appended: ``up 3.2 t1 V``). Other names are kept."""
    m = _LAYER.search(layer)
    if not m:
        return layer.replace(".weight", "")
    where, block, attn, tb, kv = m.groups()
    name = {"down_blocks": "down", "up_blocks": "up", "mid_block": "mid"}[where]
    pos = f"{block}.{attn}" if block else attn
    return f"{name} {pos}{f' t{tb}' if tb != '0' else ''} {kv.upper()}"


# ----------------------------------------------------------------------------- markdown
def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "—"
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "—" if math.isnan(v) else f"{v:.{nd}f}"


def md_table(columns: list[str], rows: list[list[Any]], nd: int = 2) -> str:
    head = "| " + " | ".join(columns) + " |\n| " + " | ".join("---" for _ in columns) + " |\n"
    return head + "".join("| " + " | ".join(_f(c, nd) if not isinstance(c, str) else c for c in r) + " |\n" for r in rows)


def matrix_table(R: np.ndarray, names: list[str]) -> str:
    T = last_stage(R)
    rows = [[f"after {t + 1}"] + [R[t, i] for i in range(len(names))] for t in range(T)]
    return md_table(["stage \\ concept"] + [f"{i + 1}:{n}" for i, n in enumerate(names)], rows)


def run_header(run_dir: Path) -> dict[str, Any]:
    """The report's title (experiment, method and tag, seed, model) and its token-to-concept table,
    from the run's ``config.yaml``; a folder without one is titled by its name."""
    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():
        return {"title": f"Evaluation report: {Path(run_dir).name}", "tokens": []}
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(cfg_path))
    method = (cfg.get("method") or {}).get("name", "?")
    model = (cfg.get("model") or {}).get("name", "?")
    tag = f" (tag {cfg['tag']})" if cfg.get("tag") else ""
    title = f"Evaluation report: {cfg.get('name', '?')}, method {method}{tag}, seed {cfg.get('seed', '?')}, model {model}"
    from ..concepts import ConceptError, concepts_from_config

    try:  # as the loop read them (micro-world concepts get their class noun and category here)
        concepts = concepts_from_config((cfg.get("data") or {}).get("concepts") or [])
    except ConceptError:
        concepts = []
    rows = [[str(i + 1), f"`{c.token}`", c.name, c.class_name, c.category] for i, c in enumerate(concepts)]
    tokens = ["## Concepts and their tokens", "", md_table(["stage", "token", "concept", "class noun", "category"], rows)] if rows else []
    return {"title": title, "tokens": tokens}


def write_report(run_dir: Path, state: EvalState) -> Path:
    """Write ``run_dir/report.md`` and its figures; returns the report's path."""
    run_dir = Path(run_dir)
    figs = run_dir / "eval" / "figures"
    res = results_from_state(state)
    T = res["stages_evaluated"]
    n = state.settings.get("n_samples")
    s, mu = res["single"], res.get("multi", {})
    idl = metric_label("dino", state)
    zs = res["zero_shot_clip_t"]
    header = run_header(run_dir)
    lines = [
        f"# {header['title']}",
        "",
        *header["tokens"],
        f"CLIP model: `{state.clip_model}`" + (f"; {metric_label('dino', state)} model: `{state.dino_model}`" if state.dino_model else "")
        + f". Stages evaluated: {T} of {state.n}. Settings: {n} samples per prompt, "
        f"{state.settings.get('num_inference_steps')} steps, guidance {state.settings.get('guidance_scale')}, "
        f"seed {state.settings.get('seed')}, at most {state.settings.get('max_prompts')} prompts per concept.",
        "",
        *(
            ["**A random tiny CLIP scored this run (eval.clip_preset=tiny): the numbers test the plumbing, not "
             "image quality. Set eval.clip_path to a real CLIP for meaningful scores.**", ""]
            if state.clip_model.startswith("tiny-random-clip") else []
        ),
        "Conventions (Custom Diffusion's evaluation script): CLIP-I = 100 x mean cosine of generated vs reference "
        "image embeddings (all pairs); CLIP-T = 100 x 2.5 x max(cos(image, prompt without modifier token), 0). "
        f"**mean** = over all {n} samples per prompt (the honest number); **best-of-{n}** = per prompt the best "
        "sample, then averaged (the paper's protocol, with N = 50).",
        "",
        "## Summary (final model)",
        "",
        md_table(
            ["metric", f"mean over {n}", f"best-of-{n}"],
            [
                ["CLIP-I single", s.get("clip_i"), s.get("clip_i_best")],
                ["CLIP-T single", s.get("clip_t"), s.get("clip_t_best")],
                ["CLIP-I multi", mu.get("clip_i"), mu.get("clip_i_best")],
                ["CLIP-T multi", mu.get("clip_t"), mu.get("clip_t_best")],
                ["zero-shot CLIP-T, base model", zs["mean"]["base"], zs["best"]["base"]],
                ["zero-shot CLIP-T, final model", zs["mean"]["final"], zs["best"]["final"]],
                ["CLIP-I gain (right after its stage - base model, class prompt)", res["gain_over_base"].get("clip_i"), None],
                ["CLIP-I forgetting (max earlier - final)", res["forgetting"]["clip_i"]["forgetting"],
                 res["forgetting"]["clip_i_best"]["forgetting"]],
                ["CLIP-I backward transfer", res["forgetting"]["clip_i"]["bwt"], res["forgetting"]["clip_i_best"]["bwt"]],
                *(
                    [[f"{idl} single", s.get("dino"), s.get("dino_best")],
                     [f"{idl} gain (right after its stage - base model, class prompt)", res["gain_over_base"].get("dino"), None],
                     [f"{idl} forgetting (max earlier - final)", res["forgetting"]["dino"]["forgetting"], res["forgetting"]["dino_best"]["forgetting"]]]
                    if "dino" in s else []
                ),  # fmt: skip
            ],
        ),
    ]
    lv = res.get("learned", {})
    if lv.get("of"):
        lines += [
            "",
            f"**Concepts learned: {lv['learned']} of {lv['of']}** by {metric_label(lv['metric'], state)} (a concept is learned when its "
            "score right after its own stage closes at least half of the gap between the base model's class-prompt samples and "
            f"the references' similarity to each other); still learned after the last stage: {lv['kept']} of {lv['of']}.",
        ]
    lines += ["", "## Forgetting matrices (mean over samples)", ""]
    for key in _keys(state):
        R = state.matrices[key]
        lines += [f"### {metric_label(key, state)}  R[t, i]", "", matrix_table(R, state.concepts)]
        if T:
            p = plot_matrix(R, state.concepts, f"{metric_label(key, state)} after stage t (rows) of concept i", figs / f"forgetting_{key}.png")
            lines += [f"![{key} forgetting matrix]({p.relative_to(run_dir)})", ""]
    if T:
        p = plot_curves(state, figs / "curves.png")
        lines += ["## Forgetting curves", "", f"![curves]({p.relative_to(run_dir)})", ""]
    lines += ["## Per concept", ""]
    rows = []
    has_id = "dino" in state.matrices
    yes = lambda v: "—" if v is None else ("yes" if v else "no")
    for name, pc in res["per_concept"].items():
        row = [name, pc.get("clip_i_base"), pc["clip_i_learned"], pc["clip_i_final"], pc["clip_i_final"] - pc["clip_i_learned"]]
        if has_id:
            row += [pc.get("dino_reference"), pc.get("dino_base"), pc["dino_learned"], pc["dino_final"]]
        rows.append(row + [pc.get("clip_t_base"), pc["clip_t_learned"], pc["clip_t_final"], yes(pc.get("learned")), yes(pc.get("kept"))])
    cols = ["concept", "CLIP-I base", "CLIP-I learned", "CLIP-I final", "change"]
    if has_id:
        cols += [f"{idl} references", f"{idl} base", f"{idl} learned", f"{idl} final"]
    lines += [md_table(cols + ["CLIP-T base", "CLIP-T learned", "CLIP-T final", "learned", "kept"], rows)]
    grid = sample_grid(run_dir, state)
    if grid is not None:
        p = figs / "samples.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        grid.save(p)
        lines += ["## Samples (rows: concepts; columns: a reference image, then stages; prompt 1, sample 1)", "", f"![samples]({p.relative_to(run_dir)})", ""]
    pairs = state.multi.get("pairs", []) if state.multi else []
    if pairs:
        lines += [f"## Multi-concept prompts (after stage {state.multi.get('after_stage')})", ""]
        lines += [md_table(["pair", "CLIP-I", "CLIP-T", f"CLIP-I best-of-{n}", f"CLIP-T best-of-{n}"],
                           [[" + ".join(r["concepts"]), r["clip_i"], r["clip_t"], r["clip_i_best"], r["clip_t_best"]] for r in pairs])]
    stats = read_selection_stats(run_dir)
    if stats:
        lines += ["## Neuron selection", ""]
        keys = ["base_density", "general_density", "concept_density", "general_share_of_base"]
        lines += [md_table(["stage", "concept"] + keys, [[str(st), nm, *[d.get("total", {}).get(k) for k in keys]] for st, nm, d in stats], nd=4)]
        p = plot_selection(stats, figs / "selection.png")
        lines += [f"![selection]({p.relative_to(run_dir)})", "", f"Per layer, stage {stats[-1][0]} ({stats[-1][1]}):", ""]
        lines += [md_table(["layer"] + keys, [[layer, *[v.get(k) for k in keys]] for layer, v in stats[-1][2]["layers"].items()], nd=4)]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
