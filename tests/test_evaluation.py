"""The continual evaluation protocol on a tiny pipeline: forgetting matrices, resume, token removal."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_concept_folder

from cns_lightning.concepts import Concept
from cns_lightning.evaluation import ContinualEvaluator
from cns_lightning.evaluation.forgetting import backward_transfer, final_mean, forgetting, last_stage
from cns_lightning.evaluation.prompts import EvalPrompt, multi_prompts, single_prompts
from cns_lightning.evaluation.metrics import self_similarity
from cns_lightning.evaluation.state import StateError
from cns_lightning.images import load_image
from cns_lightning.models import build_random_pipeline, cross_attention_kv

# Small and fast: 2 samples per prompt, 2 steps, 1 prompt per concept, no CFG (guidance 1 = one UNet pass).
SETTINGS = dict(
    n_images=2, num_inference_steps=2, max_prompts=1, guidance_scale=1.0, zero_shot_prompts=["a canal in Amsterdam"], batch_size=16
)


def make_concepts(root, names=(("teddy", "teddy bear"), ("mug", "mug"), ("vase", "vase"))) -> list[Concept]:
    return [
        Concept(name=n, token=f"<new{i + 1}>", class_name=c, path=make_concept_folder(root / n, n=2, seed=i, size=40))
        for i, (n, c) in enumerate(names)
    ]


def add_tokens(pipe, concepts) -> None:
    """What the training loop does before stage 1: the modifier tokens join the tokenizer."""
    pipe.tokenizer.add_tokens([c.token for c in concepts])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)


@torch.no_grad()
def learn(pipe, seed: int) -> None:
    """Stand-in for training a stage: a seeded change of every cross-attention K/V weight."""
    g = torch.Generator().manual_seed(seed)
    for p in cross_attention_kv(pipe.unet).values():
        p.add_(0.5 * torch.randn(p.shape, generator=g))


def run_sequence(run_dir, concepts, pipe, interrupt_after: int | None = None, **kw) -> tuple[ContinualEvaluator, dict]:
    """before_training, after_stage 1..T (optionally a fresh evaluator after `interrupt_after`), finish."""
    ev = ContinualEvaluator(**{**SETTINGS, **kw})
    ev.setup(run_dir, concepts, "cpu")
    ev.before_training(pipe)
    snapshot = {}
    for t in range(1, len(concepts) + 1):
        if interrupt_after is not None and t == interrupt_after + 1:
            snapshot = {k: M.copy() for k, M in ev.state.matrices.items()}
            ev = ContinualEvaluator(**{**SETTINGS, **kw})  # a new process resuming the run
            ev.setup(run_dir, concepts, "cpu")
        learn(pipe, seed=t)
        ev.after_stage(pipe, t, concepts[:t])
    ev.finish(pipe, concepts)
    return ev, snapshot


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    concepts = make_concepts(root / "data")
    pipe = build_random_pipeline("tiny")
    add_tokens(pipe, concepts)
    ev, snapshot = run_sequence(root / "run", concepts, pipe, interrupt_after=2)
    return dict(root=root, run_dir=root / "run", concepts=concepts, pipe=pipe, ev=ev, snapshot=snapshot)


def test_forgetting_matrix_filled_below_and_nan_above(run):
    st = run["ev"].state
    for key in ("clip_i", "clip_t", "clip_i_best", "clip_t_best"):
        R = st.matrices[key]
        assert R.shape == (3, 3)
        for t in range(3):
            for i in range(3):
                assert math.isnan(R[t, i]) == (i > t), (key, t, i, R)
    assert sorted(st.stages_done) == [1, 2, 3] and run["ev"].is_evaluated(3)
    # Best-of-N is never below the mean over the same samples.
    lower = ~np.isnan(st.matrices["clip_i"])
    assert np.all(st.matrices["clip_i_best"][lower] >= st.matrices["clip_i"][lower] - 1e-6)
    # The "learning" between stages changed the scores of earlier concepts.
    assert st.matrices["clip_i"][2, 0] != st.matrices["clip_i"][0, 0]
    # On disk: strict JSON, null above the diagonal, same numbers.
    saved = json.loads((run["run_dir"] / "eval" / "state.json").read_text())
    assert saved["matrices"]["clip_i"][0][1] is None and saved["concepts"] == ["teddy", "mug", "vase"]
    assert saved["matrices"]["clip_i"][2][0] == pytest.approx(st.matrices["clip_i"][2, 0])
    assert len(saved["zero_shot"]["mean"]) == 4 and None not in saved["zero_shot"]["mean"]
    assert set(saved["base"]["clip_i"]) == {"teddy", "mug", "vase"}


def test_resume_continues_the_matrices(run):
    """Rows 1-2 were measured by the first evaluator; the resumed one kept them and added row 3."""
    before, st = run["snapshot"], run["ev"].state
    assert last_stage(before["clip_i"]) == 2
    for key, M in before.items():
        np.testing.assert_array_equal(st.matrices[key][:2], M[:2])
    assert not np.isnan(st.matrices["clip_i"][2]).any()


def test_same_noise_every_stage_so_re_evaluation_is_exact(run, tmp_path):
    """A fresh evaluator on an unchanged model reproduces the last row exactly (fixed seeds)."""
    ev = ContinualEvaluator(**SETTINGS)
    ev.setup(tmp_path / "again", run["concepts"], "cpu")
    ev.after_stage(run["pipe"], 1, run["concepts"][:1])
    assert ev.state.matrices["clip_i"][0, 0] == run["ev"].state.matrices["clip_i"][2, 0]
    assert ev.state.matrices["clip_t"][0, 0] == run["ev"].state.matrices["clip_t"][2, 0]


def test_matrix_entry_equals_a_direct_computation_without_the_token(run, monkeypatch):
    ev, pipe, c = run["ev"], run["pipe"], run["concepts"][0]
    prompts = single_prompts(c, SETTINGS["max_prompts"])
    assert all("<new1>" in p.generate and "<new1>" not in p.clip_text for p in prompts)
    seen: list[str] = []
    original = ev.clip.text_embeddings
    monkeypatch.setattr(ev.clip, "text_embeddings", lambda texts: (seen.extend(texts), original(texts))[1])
    images = ev.generate(pipe, [p.generate for p in prompts])
    res = ev.score(prompts, images)
    templates = c.eval_prompts()[: SETTINGS["max_prompts"]]
    assert seen == [c.fill(t, with_token=False) for t in templates] == ["a teddy bear in the jungle"]
    # By hand from the CLIP model's embeddings.
    flat = [im for ims in images for im in ims]
    img = ev.clip.image_embeddings(flat)
    txt = original(seen)
    cos = torch.stack([img[2 * j : 2 * j + 2] @ txt[j] for j in range(len(prompts))])
    assert res["clip_t"] == pytest.approx(float((250 * cos.clamp(min=0)).mean()), abs=1e-4)
    refs = ev.clip.image_embeddings([load_image(p) for p in c.image_paths()])
    assert res["clip_i"] == pytest.approx(float(100 * (img @ refs.T).mean()), abs=1e-4)
    # The matrix holds exactly this (same model as after stage 3, same seeds).
    assert ev.state.matrices["clip_t"][2, 0] == pytest.approx(res["clip_t"], abs=1e-5)
    assert ev.state.matrices["clip_i"][2, 0] == pytest.approx(res["clip_i"], abs=1e-5)
    # With the token left in, CLIP would see a different text (the score would change).
    with_token = original([p.generate for p in prompts])
    assert not torch.allclose(with_token, txt)
    assert float((250 * torch.stack([img[2 * j : 2 * j + 2] @ with_token[j] for j in range(len(prompts))]).clamp(min=0)).mean()) != pytest.approx(
        res["clip_t"], abs=1e-3
    )


def test_finish_scores_pairs_and_writes_results_and_report(run):
    ev, run_dir = run["ev"], run["run_dir"]
    res = json.loads((run_dir / "eval" / "results.json").read_text())
    pairs = ev.state.multi["pairs"]
    assert [p["concepts"] for p in pairs] == [["teddy", "mug"], ["teddy", "vase"], ["mug", "vase"]]
    for p in pairs:
        for pr in p["prompts"]:
            assert "<new" not in pr["clip_text"] and pr["prompt"].count("<new") == 2
    assert res["multi"]["clip_i"] == pytest.approx(np.mean([p["clip_i"] for p in pairs]))
    assert res["single"]["clip_i"] == pytest.approx(final_mean(ev.state.matrices["clip_i"]))
    assert res["clip_model"].startswith("tiny-random-clip") and res["settings"]["n_samples"] == 2
    assert set(res["per_concept"]) == {"teddy", "mug", "vase"}
    report = (run_dir / "report.md").read_text()
    for fig in ("forgetting_clip_i.png", "forgetting_clip_t.png", "curves.png", "samples.png"):
        assert f"eval/figures/{fig}" in report and (run_dir / "eval" / "figures" / fig).stat().st_size > 0
    assert "best-of-2" in report and "Multi-concept" in report
    assert (run_dir / "eval" / "samples" / "stage_03" / "vase_p00.png").exists()
    assert (run_dir / "eval" / "samples" / "stage_00" / "teddy_p00.png").exists()


def test_multi_clip_i_is_mean_over_the_prompts_concepts(run):
    ev, pipe = run["ev"], run["pipe"]
    a, b = run["concepts"][:2]
    prompts = multi_prompts(a, b, ["a photo of a {a} and a {b}"], None)
    assert prompts[0].generate == "a photo of a <new1> teddy bear and a <new2> mug"
    assert prompts[0].clip_text == "a photo of a teddy bear and a mug"
    images = ev.generate(pipe, [prompts[0].generate])
    res = ev.score(prompts, images)
    img = ev.clip.image_embeddings(images[0])
    each = [float(100 * (img @ ev.references(c)["clip"].T).mean()) for c in (a, b)]
    assert res["clip_i"] == pytest.approx(np.mean(each), abs=1e-4)


def test_resume_with_another_sequence_is_refused(run, tmp_path):
    ev = ContinualEvaluator(**SETTINGS)
    with pytest.raises(StateError, match="keep the order"):
        ev.setup(run["run_dir"], list(reversed(run["concepts"])), "cpu")
    ev = ContinualEvaluator(**SETTINGS, clip_seed=4)
    with pytest.raises(StateError, match="not be comparable"):
        ev.setup(run["run_dir"], run["concepts"], "cpu")


def test_wrong_stage_calls_are_refused(run, tmp_path):
    ev = ContinualEvaluator(**SETTINGS)
    ev.setup(tmp_path, run["concepts"], "cpu")
    with pytest.raises(ValueError, match="expected the first 2"):
        ev.after_stage(run["pipe"], 2, run["concepts"][1:])
    with pytest.raises(ValueError, match="stages are 1..3"):
        ev.after_stage(run["pipe"], 4, run["concepts"])
    with pytest.raises(TypeError, match="unknown key"):
        ContinualEvaluator(n_image=3)


def test_disabled_evaluator_does_nothing(run, tmp_path):
    ev = ContinualEvaluator(enabled=False)
    ev.setup(tmp_path, run["concepts"], "cpu")
    assert ev.before_training(run["pipe"]) == {} and ev.after_stage(run["pipe"], 1, run["concepts"][:1]) == {}
    assert ev.finish(run["pipe"], run["concepts"]) == {} and not (tmp_path / "eval").exists()


def test_stage_metrics_and_logging_payloads(run):
    ev = run["ev"]
    m = ev.stage_metrics(3)
    assert m["eval/clip_i/vase"] == ev.state.matrices["clip_i"][2, 2]
    assert m["eval/clip_i"] == pytest.approx(np.mean(ev.state.matrices["clip_i"][2]))
    assert m["eval/forgetting/clip_i"] == pytest.approx(forgetting(ev.state.matrices["clip_i"]))
    assert "eval/zero_shot_clip_t" in m and "eval/clip_i_gain/teddy" in m
    cols, rows = ev.stage_tables()["forgetting/clip_i"]
    assert cols == ["stage", "teddy", "mug", "vase"] and len(rows) == 3 and rows[0][2] is None
    grid = ev.stage_images()["samples/grid"]
    assert grid.size[1] > 4 * 32  # 3 concepts + zero-shot rows


def test_forgetting_summaries_by_hand():
    nan = math.nan
    R = np.array([[80.0, nan, nan], [70.0, 60.0, nan], [75.0, 50.0, 90.0]])
    # forgetting: concept 1: max(80, 70) - 75 = 5; concept 2: 60 - 50 = 10 -> 7.5
    assert forgetting(R) == pytest.approx(7.5)
    # bwt: (75 - 80 + 50 - 60) / 2 = -7.5
    assert backward_transfer(R) == pytest.approx(-7.5)
    assert final_mean(R) == pytest.approx((75 + 50 + 90) / 3)
    assert last_stage(R[:2]) == 2 and math.isnan(forgetting(R[:1, :1]))


def test_eval_prompt_token_removal_for_every_category(tmp_path):
    for cat in ("object", "live_subject", "style", "scene"):
        c = Concept(name="x", token="<new7>", class_name="thing", category=cat, path=tmp_path)
        for p in single_prompts(c, None):
            assert isinstance(p, EvalPrompt) and "<new7>" in p.generate and "<new7>" not in p.clip_text
            assert "  " not in p.clip_text and p.clip_text == p.generate.replace("<new7> ", "")


def _tiny_dino(folder) -> str:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    return str(folder)


def test_dino_matrices_when_a_dino_model_is_given(run, tmp_path):
    ev = ContinualEvaluator(**SETTINGS, dino_path=_tiny_dino(tmp_path / "dino"))
    ev.setup(tmp_path / "run", run["concepts"][:2], "cpu")
    m = ev.after_stage(run["pipe"], 1, run["concepts"][:1])
    assert set(ev.state.matrices) == {"clip_i", "clip_t", "clip_i_best", "clip_t_best", "dino", "dino_best"}
    assert m["eval/dino/teddy"] == ev.state.matrices["dino"][0, 0] and -100 <= m["eval/dino/teddy"] <= 100
    assert json.loads((tmp_path / "run" / "eval" / "state.json").read_text())["dino_model"] == str(tmp_path / "dino")
    # the references' self-similarity (the "learned" rule's target) is recorded for both embeddings
    ref = ev.state.base["reference"]
    refs = ev.references(run["concepts"][0])
    assert ref["dino"]["teddy"] == pytest.approx(self_similarity(refs["dino"])) and "teddy" in ref["clip_i"]
    assert (tmp_path / "run" / "eval" / "samples" / "references" / "teddy.png").is_file()


def test_base_model_identity_scores_and_learned_verdicts(run, tmp_path):
    ev = ContinualEvaluator(**SETTINGS, dino_path=_tiny_dino(tmp_path / "dino"))
    ev.setup(tmp_path / "run", run["concepts"][:1], "cpu")
    ev.before_training(run["pipe"])
    assert set(ev.state.base["dino"]) == {"teddy"} and set(ev.state.base["reference"]["dino"]) == {"teddy"}
    ev.after_stage(run["pipe"], 1, run["concepts"][:1])
    res = ev.finish(run["pipe"], run["concepts"][:1])
    pc = res["per_concept"]["teddy"]
    assert res["learned"]["metric"] == "dino" and res["learned"]["of"] == 1
    assert pc["learned"] == (pc["dino_learned"] - pc["dino_base"] >= 0.5 * (pc["dino_reference"] - pc["dino_base"]))


def _ranked_eval(rank: int, world: int, init: str, root: str, out: dict) -> None:
    """One rank of a gloo group: the same tiny model and concepts, the whole protocol in its own
    run folder (rank 0's is the run's; rank 1's must stay empty: only rank 0 writes)."""
    import torch.distributed as dist
    from pathlib import Path

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    root = Path(root)
    concepts = make_concepts(root / "data")
    pipe = build_random_pipeline("tiny")
    add_tokens(pipe, concepts)
    ev, _ = run_sequence(root / f"rank{rank}", concepts[:2], pipe, n_images=3)
    out[rank] = {k: M.copy() for k, M in ev.state.matrices.items()}, dict(ev.state.zero_shot), ev.state.multi["clip_i"]
    dist.destroy_process_group()


def test_two_ranks_split_the_images_and_get_the_single_process_scores(tmp_path):
    """Under torch.distributed (2 gloo processes) each rank samples every other image; the gathered
    scores equal one process's, on both ranks, and rank 1 writes nothing."""
    import torch.multiprocessing as mp

    make_concepts(tmp_path / "data")  # the same folders for every process
    out = mp.Manager().dict()
    # fork: the ranks reuse this process's imports (CPU and gloo only, no CUDA state to inherit)
    mp.start_processes(_ranked_eval, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path), out), nprocs=2, join=True, start_method="fork")
    concepts = make_concepts(tmp_path / "data")
    pipe = build_random_pipeline("tiny")
    add_tokens(pipe, concepts)
    ev, _ = run_sequence(tmp_path / "single", concepts[:2], pipe, n_images=3)
    for rank in (0, 1):
        matrices, zero_shot, multi = out[rank]
        for key, M in ev.state.matrices.items():
            # the same images up to +-1 in a pixel (batches of other sizes): scores (0-100) within 0.01
            np.testing.assert_allclose(matrices[key], M, atol=1e-2, equal_nan=True)
        np.testing.assert_allclose(zero_shot["mean"], ev.state.zero_shot["mean"], atol=1e-2)
        assert multi == pytest.approx(ev.state.multi["clip_i"], abs=1e-2)
    assert (tmp_path / "rank0" / "eval" / "state.json").is_file() and (tmp_path / "rank0" / "report.md").is_file()
    assert not (tmp_path / "rank1").exists() or not any((tmp_path / "rank1").rglob("*.*"))
