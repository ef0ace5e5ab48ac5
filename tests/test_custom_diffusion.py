"""Custom Diffusion's closed-form merge (``methods.custom_diffusion``): the equation on small
matrices against a direct solve, and the method in the loop (each concept from the base model; the
model after stage m meets every concept's targets)."""

from __future__ import annotations

import pytest
import torch

from omegaconf import OmegaConf

from cns_lightning import continual
from cns_lightning.methods import RunContext
from cns_lightning.methods.custom_diffusion import (
    CONCEPT_KV_FILE, constrained_merge, merge_operator, target_prompts, text_features,
)
from cns_lightning.models import cross_attention_kv
from cns_lightning.preflight import ConfigValueError
from cns_lightning.restore import build_base, load_run
from cns_lightning.state import read_stage
from conftest import FAST, compose_cfg, concepts_override, make_concept_folder


def _problem(out=5, d=8, n=3, r=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return rand(out, d), rand(out, n), rand(n, d), rand(r, d)


def _objective(w, w0, c_reg):
    return float(torch.linalg.matrix_norm((w - w0) @ c_reg.T))


def _direct_solve(w0, v, c_tgt, c_reg):
    """The same problem by its KKT system, row by row: [2M C^T; C 0] [w; mu] = [2M w0; v]."""
    d, n = c_tgt.shape[1], c_tgt.shape[0]
    m = c_reg.T @ c_reg
    kkt = torch.zeros(d + n, d + n, dtype=torch.float64)
    kkt[:d, :d], kkt[:d, d:], kkt[d:, :d] = 2 * m, c_tgt.T, c_tgt
    rhs = torch.cat([2 * m @ w0.T, v.T])  # (d + n) x out
    return torch.linalg.solve(kkt, rhs)[:d].T


def test_the_merge_meets_the_constraint_exactly_and_matches_a_direct_solve():
    w0, v, c_tgt, c_reg = _problem()
    w = constrained_merge(w0, v, c_tgt, c_reg)
    assert torch.allclose(w @ c_tgt.T, v, atol=1e-10, rtol=0), "W C_tgt^T = V_tgt must hold"
    direct = _direct_solve(w0, v, c_tgt, c_reg)
    assert torch.allclose(w, direct, atol=1e-9, rtol=0)
    assert _objective(w, w0, c_reg) == pytest.approx(_objective(direct, w0, c_reg), rel=1e-10)


def test_no_feasible_weight_is_closer_to_the_base_outputs():
    w0, v, c_tgt, c_reg = _problem(seed=1)
    w = constrained_merge(w0, v, c_tgt, c_reg)
    best = _objective(w, w0, c_reg)
    null = torch.linalg.svd(c_tgt).Vh[c_tgt.shape[0]:]  # directions with D C_tgt^T = 0
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        delta = torch.randn(w.shape[0], null.shape[0], generator=g, dtype=torch.float64) @ null
        assert torch.allclose((w + delta) @ c_tgt.T, v, atol=1e-9)  # still feasible
        assert _objective(w + delta, w0, c_reg) > best


def test_the_merge_of_the_base_outputs_is_the_base_model():
    w0, _, c_tgt, c_reg = _problem(seed=3)
    assert torch.allclose(constrained_merge(w0, w0 @ c_tgt.T, c_tgt, c_reg), w0, atol=1e-12)


def test_ridge_makes_a_rank_deficient_regularization_set_solvable():
    w0, v, c_tgt, _ = _problem(seed=4)
    c_reg = torch.randn(4, 8, dtype=torch.float64)  # 4 rows in 8 dimensions: C_reg^T C_reg is singular
    w = constrained_merge(w0, v, c_tgt, c_reg, ridge=1e-6)
    assert torch.isfinite(w).all()
    assert torch.allclose(w @ c_tgt.T, v, atol=1e-6)
    op = merge_operator(c_tgt, c_reg, ridge=1e-6)
    assert torch.equal(constrained_merge(w0, v, c_tgt, c_reg, operator=op), w)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cd")
    dirs = [make_concept_folder(tmp / "data" / n, n=3, seed=k) for k, n in enumerate(("teddy", "mug"))]
    cfg = compose_cfg(tmp, [concepts_override(dirs), "method=custom_diffusion", *FAST, "~logger", "calibration.num_prompts=4"])
    result = continual.run(cfg)
    return tmp / "run", result


def test_the_model_after_stage_2_meets_both_concepts_targets_and_is_neither_alone(run_dir):
    folder, result = run_dir
    pipe, learned = load_run(folder)
    w0 = cross_attention_kv(build_base(OmegaConf.load(folder / "config.yaml")).unet)
    own = [read_stage(s).tensors[CONCEPT_KV_FILE] for s in sorted((folder / "stages").iterdir())]  # W_i - W_0: from the base model
    kv = cross_attention_kv(pipe.unet)
    ids = {c.name: pipe.tokenizer.convert_tokens_to_ids(c.token) for c in learned}
    ctx = RunContext(pipe=pipe, concepts=learned, token_ids=ids)
    for i, c in enumerate(learned):
        feats = text_features(ctx, target_prompts(c), ids[c.name]).double()
        for n, w in kv.items():
            w_i = w0[n].double() + own[i][n].double()
            assert torch.allclose(w.double() @ feats.T, w_i @ feats.T, atol=1e-4, rtol=1e-4), f"{c.name}: {n} misses its target"
    for i in range(2):
        assert any(not torch.allclose(w.double(), w0[n].double() + own[i][n].double(), atol=1e-6) for n, w in kv.items()), f"the merge is concept {i + 1} alone"
    fusion = result["fusion"]
    assert fusion["stages"] == 2 and fusion["time_s"] > 0 and fusion["last_stage"]["stage"] == 2
    assert all(s["merge_seconds"] > 0 and "merge_cpu_peak_bytes" in s for s in result["stages"])
    saved = [read_stage(s).info for s in sorted((folder / "stages").iterdir())]
    assert [s["merge_seconds"] for s in saved] == [s["merge_seconds"] for s in result["stages"]], "stage.json keeps the merge cost"


@pytest.mark.parametrize("bad, key", [("method.ridge=-1", "method.ridge"), ("method.lr_neurons=-1e-5", "method.lr_neurons")])
def test_a_negative_knob_fails_before_anything_is_written(tmp_path, bad, key):
    dirs = [make_concept_folder(tmp_path / "data" / "teddy", n=3)]
    cfg = compose_cfg(tmp_path, [concepts_override(dirs), "method=custom_diffusion", *FAST, bad])
    with pytest.raises(ConfigValueError, match=rf"{key}=.*>= 0.*e\.g\. {key}="):
        continual.run(cfg)
    assert not (tmp_path / "run").exists()


def test_ridge_0_with_a_singular_regularization_gram_fails_before_any_stage(tmp_path):
    """The tiny model's text features span its 32 dimensions only up to a singular value ratio of
    about 1e-8 (measured: 6.6e-7 against 47.5), so C_reg^T C_reg is singular in float64 and ridge 0
    cannot merge."""
    dirs = [make_concept_folder(tmp_path / "data" / "teddy", n=3)]
    cfg = compose_cfg(tmp_path, [concepts_override(dirs), "method=custom_diffusion", *FAST, "~logger", "calibration.num_prompts=4", "method.ridge=0"])
    with pytest.raises(ConfigValueError, match=r"method\.ridge=0: .* singular .* Fix: method\.ridge=1e-5"):
        continual.run(cfg)
    assert not (tmp_path / "run" / "stages").exists() or not any((tmp_path / "run" / "stages").iterdir()), "a stage was written"


def test_target_rows_are_the_token_through_the_end_token_or_the_token_alone():
    from cns_lightning.concepts import Concept
    from cns_lightning.models import build_random_pipeline
    from cns_lightning.tokens import add_concept_tokens

    torch.manual_seed(0)
    pipe = build_random_pipeline("tiny")
    concept = Concept(name="teddy", token="<new1>", class_name="teddy bear")
    ids = add_concept_tokens(pipe.tokenizer, pipe.text_encoder, [concept])
    ctx = RunContext(pipe=pipe, concepts=[concept], token_ids=ids)
    prompts = target_prompts(concept)
    assert prompts == ["<new1> teddy bear", "photo of a <new1> teddy bear"]
    tails = [len(pipe.tokenizer(p).input_ids) - 1 - pipe.tokenizer(p).input_ids.index(ids["teddy"]) for p in prompts]  # token .. end token
    span = text_features(ctx, prompts, ids["teddy"], "token_to_eos")
    alone = text_features(ctx, prompts, ids["teddy"], "token")
    assert span.shape[0] == sum(t + 1 for t in tails) and alone.shape[0] == len(prompts)
    assert torch.equal(alone[0], span[0]) and torch.equal(alone[1], span[tails[0] + 1])
    assert text_features(ctx, prompts).shape[0] == 2 * pipe.tokenizer.model_max_length
