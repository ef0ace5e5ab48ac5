"""report.md from an evaluator state: tables, figures, sample grid, selection statistics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from cns_lightning.evaluation.report import read_selection_stats, sample_grid, write_report
from cns_lightning.evaluation.state import EvalState
from cns_lightning.evaluation.summary import results_from_state

PNG = b"\x89PNG\r\n\x1a\n"


def make_state(run_dir, stages: int = 2) -> EvalState:
    st = EvalState.new(["dog", "mug"], "tiny-clip", {"n_samples": 4, "num_inference_steps": 2, "guidance_scale": 6.0, "seed": 0, "max_prompts": 1})
    st.matrices["clip_i"][:] = [[71.25, math.nan], [66.5, 80.0]]
    st.matrices["clip_t"][:] = [[60.0, math.nan], [61.0, 62.0]]
    st.matrices["clip_i_best"][:] = [[75.0, math.nan], [70.0, 85.0]]
    st.matrices["clip_t_best"][:] = [[65.0, math.nan], [66.0, 67.0]]
    for M in st.matrices.values():
        M[stages:] = math.nan
    st.base = {"clip_i": {"dog": 60.0, "mug": 55.0}, "clip_t": {"dog": 58.0, "mug": 57.0}}
    st.zero_shot = {"mean": [70.0, 69.0, 68.0][: stages + 1] + [math.nan] * (2 - stages), "best": [72.0, 71.0, 70.0]}
    st.stages_done = list(range(1, stages + 1))
    for s in range(stages + 1):
        files = {}
        for k, name in enumerate(["dog", "mug", "zero_shot"]):
            if s == 0 or name == "zero_shot" or k < s:
                p = run_dir / "eval" / "samples" / f"stage_{s:02d}" / f"{name}_p00.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32), (40 * k, 80, 20 * s)).save(p)
                files[name] = [str(p.relative_to(run_dir))]
        st.samples[str(s)] = files
    return st


def write_selection(run_dir, stage: int, name: str, density: float) -> None:
    layers = {f"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_{kv}.weight": {
        "base_density": 0.2, "general_density": 0.1, "concept_density": density, "general_share_of_base": 0.5} for kv in "kv"}
    d = run_dir / f"stage_{stage:02d}_{name}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "selection.json").write_text(json.dumps({"layers": layers, "total": {"base_density": 0.2, "general_density": 0.1,
                                                                               "concept_density": density, "general_share_of_base": 0.53}}))


def test_report_tables_figures_and_selection(tmp_path):
    st = make_state(tmp_path)
    write_selection(tmp_path, 1, "dog", 0.11)
    write_selection(tmp_path, 2, "mug", 0.09)
    path = write_report(tmp_path, st)
    md = path.read_text()
    assert path == tmp_path / "report.md"
    assert "| after 2 | 66.50 | 80.00 |" in md and "| after 1 | 71.25 | — |" in md
    # CLIP-I single (final) = (66.5 + 80) / 2; best-of labelled with N.
    assert "| CLIP-I single | 73.25 | 77.50 |" in md and "best-of-4" in md
    assert "| zero-shot CLIP-T, base model | 70.00 | 72.00 |" in md
    # forgetting of concept 1: 71.25 - 66.5
    assert "| CLIP-I forgetting (max earlier - final) | 4.75 |" in md
    assert "## Neuron selection" in md and "| 2 | mug | 0.2000 | 0.1000 | 0.0900 | 0.5300 |" in md
    assert "random tiny CLIP" not in md
    for fig in ("forgetting_clip_i", "forgetting_clip_t", "curves", "samples", "selection"):
        f = tmp_path / "eval" / "figures" / f"{fig}.png"
        assert f"eval/figures/{fig}.png" in md and f.read_bytes()[:8] == PNG


def test_sample_grid_rows_are_concepts_and_columns_references_then_stages(tmp_path):
    st = make_state(tmp_path)
    refs = tmp_path / "eval" / "samples" / "references"
    refs.mkdir(parents=True)
    Image.new("RGB", (32, 32), (0, 0, 250)).save(refs / "dog.png")
    grid = sample_grid(tmp_path, st)
    assert grid.size == (110 + 4 * 32, 18 + 3 * 32)  # reference, stages 0..2; rows dog/mug/zero-shot
    assert grid.getpixel((110 + 16, 18 + 16)) == (0, 0, 250)  # dog's reference image
    assert grid.getpixel((110 + 16, 18 + 32 + 16)) == (255, 255, 255)  # mug has none
    # The mug cell at stage 1 is empty (mug not learned yet): white.
    assert grid.getpixel((110 + 2 * 32 + 16, 18 + 32 + 16)) == (255, 255, 255)
    assert grid.getpixel((110 + 3 * 32 + 16, 18 + 32 + 16)) == (40, 80, 40)
    assert sample_grid(tmp_path, st, upto=0).size == (110 + 2 * 32, 18 + 3 * 32)


def test_identity_metric_rows_and_the_learned_rule(tmp_path):
    st = EvalState.new(["dog", "mug"], "micro-clip", {"n_samples": 2}, dino_model="/x/assets/micro/identity")
    for k in ("clip_i", "clip_i_best", "clip_t", "clip_t_best"):
        st.matrices[k][:] = [[30.0, math.nan], [29.0, 31.0]]
    # identity: dog 10 -> 40 (half the gap to 60 is 35: learned), then 30 (no longer); mug 10 -> 20 (not learned)
    st.matrices["dino"][:] = [[40.0, math.nan], [30.0, 20.0]]
    st.matrices["dino_best"][:] = [[45.0, math.nan], [35.0, 25.0]]
    st.base = {"clip_i": {"dog": 25.0, "mug": 25.0}, "clip_t": {"dog": 1.0, "mug": 1.0}, "dino": {"dog": 10.0, "mug": 10.0},
               "reference": {"clip_i": {"dog": 50.0, "mug": 50.0}, "dino": {"dog": 60.0, "mug": 60.0}}}
    st.zero_shot = {"mean": [1.0, 1.0, 1.0], "best": [1.0, 1.0, 1.0]}
    st.stages_done = [1, 2]
    res = results_from_state(st)
    assert res["learned"] == {**res["learned"], "metric": "dino", "learned": 1, "kept": 0, "of": 2}
    assert res["per_concept"]["dog"]["learned"] and not res["per_concept"]["dog"]["kept"]
    assert res["gain_over_base"]["dino"] == pytest.approx(((40 - 10) + (20 - 10)) / 2)  # right after each stage
    assert res["concept1_drop"]["dino"] == pytest.approx(40 - 30) and res["zero_shot_clip_t"]["mean"]["drift"] == 0.0
    md = write_report(tmp_path, st).read_text()
    assert "ID model: `/x/assets/micro/identity`" in md and "### ID  R[t, i]" in md
    assert "| ID single | 25.00 | 30.00 |" in md and "**Concepts learned: 1 of 2** by ID" in md
    assert "| dog | 25.00 | 30.00 | 29.00 | -1.00 | 60.00 | 10.00 | 40.00 | 30.00 |" in md and "| yes | no |" in md
    assert (tmp_path / "eval" / "figures" / "forgetting_dino.png").is_file()


def test_partial_run_report_and_results(tmp_path):
    st = make_state(tmp_path, stages=1)
    md = write_report(tmp_path, st).read_text()
    assert "Stages evaluated: 1 of 2" in md and "Neuron selection" not in md
    st.clip_model = "tiny-random-clip(seed=3)"
    assert "random tiny CLIP scored this run" in write_report(tmp_path, st).read_text()
    res = results_from_state(st)
    assert res["single"]["clip_i"] == 71.25 and math.isnan(res["forgetting"]["clip_i"]["forgetting"])
    assert res["gain_over_base"]["clip_i"] == pytest.approx(11.25)
    assert res["zero_shot_clip_t"]["mean"]["final"] == 69.0


def test_bad_selection_file_is_named(tmp_path):
    d = tmp_path / "stage_01_dog"
    d.mkdir()
    (d / "selection.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="stage_01_dog/selection.json"):
        read_selection_stats(tmp_path)
    (d / "selection.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        read_selection_stats(tmp_path)


def test_loop_stage_folders_are_read(tmp_path):
    d = tmp_path / "stages" / "02_mug"
    d.mkdir(parents=True)
    stats = {"layers": {"a.attn2.to_k.weight": {"entries": 64, "concept_density": 0.25}}, "total": {"entries": 64, "concept_density": 0.25}}
    (d / "selection.json").write_text(json.dumps(stats))
    assert read_selection_stats(tmp_path) == [(2, "mug", stats)]
    md = write_report(tmp_path, make_state(tmp_path)).read_text()
    assert "| 2 | mug | — | — | 0.2500 | — |" in md and "| a.attn2.to_k.weight | — | — | 0.2500 | — |" in md


def test_selection_folder_layout_is_read_too(tmp_path):
    (tmp_path / "selection").mkdir()
    (tmp_path / "selection" / "stage_03_vase.json").write_text(json.dumps({"layers": {}, "total": {"concept_density": 0.1}}))
    assert read_selection_stats(tmp_path) == [(3, "vase", {"layers": {}, "total": {"concept_density": 0.1}})]
    assert np.isnan(EvalState.new(["a"], "c", {}).matrices["clip_i"]).all()


def test_report_title_names_the_run_and_lists_every_token(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "name: seq7\ntag: _l1_0.5\nseed: 3\nmodel: {name: micro}\nmethod: {name: cns}\n"
        "data:\n  concepts:\n  - {name: dog, class_name: dog, category: live_subject, path: /x}\n"
        "  - {name: mug, class_name: mug, token: '<mymug>', path: /y}\n  - {name: cat_tabby, source: microworld}\n")
    md = write_report(tmp_path, make_state(tmp_path)).read_text()
    assert md.startswith("# Evaluation report: seq7, method cns (tag _l1_0.5), seed 3, model micro\n")
    assert "| 1 | `<new1>` | dog | dog | live_subject |" in md
    assert "| 2 | `<mymug>` | mug | mug | object |" in md
    assert "| 3 | `<new3>` | cat_tabby | cat | live_subject |" in md  # a micro-world concept's class noun


def test_layer_labels_are_readable():
    from cns_lightning.evaluation.report import layer_label

    assert layer_label("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight") == "down 1.0 K"
    assert layer_label("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v.weight") == "up 3.2 V"
    assert layer_label("mid_block.attentions.0.transformer_blocks.1.attn2.to_k.weight") == "mid 0 t1 K"
    assert layer_label("something.else.weight") == "something.else"


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_legends_cover_no_panel(tmp_path):
    """Every legend of the curves and selection figures lies outside every axes (none hides a curve)."""
    from cns_lightning.evaluation.report import curves_figure, read_selection_stats, selection_figure

    st = make_state(tmp_path)
    for k in range(1, 3):
        write_selection(tmp_path, k, ["dog", "mug"][k - 1], 0.1)
    for fig in (curves_figure(st), selection_figure(read_selection_stats(tmp_path))):
        fig.tight_layout()
        renderer = fig.canvas.get_renderer()
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert len(legends) == 1
        box = legends[0].get_window_extent(renderer)
        for ax in fig.axes:
            assert not _overlaps(box, ax.get_window_extent(renderer)), "a legend covers a panel"
