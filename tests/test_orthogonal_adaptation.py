"""Orthogonal Adaptation (``methods/orthogonal_adaptation.py``): disjoint slices of one random
orthogonal basis per layer, so two concepts' down-projections are orthogonal (peft's ``lora_A``,
frozen); merge = sum, which diffusers' loader given both stages' LoRA files reproduces; a basis too
small for the sequence fails before anything trains."""

from __future__ import annotations

import pytest
import torch

from cns_lightning import continual
from peft.tuners.lora import LoraLayer

from cns_lightning.methods.lora import LORA_FILE, factors, unet_targets
from cns_lightning.methods.orthogonal_adaptation import concept_slice, orthogonal_basis
from cns_lightning.preflight import ConfigValueError
from cns_lightning.restore import build_base
from cns_lightning.state import read_stage
from conftest import FAST, compose_cfg, concepts_override, make_concept_folder, unet_output


def test_the_basis_is_orthogonal_and_slices_are_disjoint():
    q = orthogonal_basis(12, torch.Generator().manual_seed(3))
    assert torch.allclose(q @ q.t(), torch.eye(12), atol=1e-5)
    a0, a1 = concept_slice(q, 0, 4), concept_slice(q, 1, 4)
    assert torch.allclose(a0 @ a1.t(), torch.zeros(4, 4), atol=1e-5)
    assert torch.equal(orthogonal_basis(12, torch.Generator().manual_seed(3)), q)  # reproducible from the seed


def _cfg(tmp_path, extra=()):
    dirs = [make_concept_folder(tmp_path / "data" / n, n=3, seed=k) for k, n in enumerate(("teddy", "mug"))]
    return compose_cfg(tmp_path, [concepts_override(dirs), "method=orthogonal_adaptation", *FAST, "~logger", "calibration.num_prompts=4", *extra])


def _run(tmp_path, extra=()):
    cfg = _cfg(tmp_path, extra)
    return cfg, continual.run(cfg)


def test_a_stage_trains_peft_s_b_on_its_frozen_slice_of_the_basis(tmp_path):
    r = continual.check_inputs(_cfg(tmp_path))
    continual.build(r)
    continual.restore(r)
    stage = r.method.begin_stage(r.ctx, 1, r.concepts[1])
    modules = dict(r.ctx.pipe.unet.named_modules())
    trained = {id(p) for p, _ in stage.trainable()}
    for name in unet_targets(r.ctx.pipe.unet, "kv"):
        layer = modules[name]
        assert isinstance(layer, LoraLayer) and layer.active_adapters == ["c0002"], name
        a, b = factors(layer, "c0002")
        assert torch.equal(a, concept_slice(r.method.bases[name], 1, 5)) and not a.requires_grad and id(a) not in trained
        assert torch.equal(b, torch.zeros_like(b)) and b.requires_grad and id(b) in trained
    # the optimizer's LoRA group holds exactly peft's lora_B.<adapter> parameters (and the token group the embeddings)
    names = {id(p): n for n, p in r.ctx.pipe.unet.named_parameters()}
    assert [g["name"] for g in stage.configure_optimizer().param_groups] == ["lora_unet", "token"]
    (group,) = stage.groups
    lora = [names[id(p)] for p in group[1]]
    assert len(lora) == len(unet_targets(r.ctx.pipe.unet, "kv")) and all(n.endswith(".lora_B.c0002.weight") for n in lora), lora[:2]
    stage.end()
    r.method.unload(r.ctx)
    assert not any(isinstance(m, LoraLayer) for m in r.ctx.pipe.unet.modules())


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # diffusers' loader, given a second adapter
def test_two_concepts_get_orthogonal_down_projections_and_the_merge_sums_them(tmp_path):
    cfg, result = _run(tmp_path, ["method.lr_lora=1e-2"])  # B moves far enough in 4 steps to tell the models apart
    assert result["status"] == "complete"
    stages = [read_stage(p) for p in sorted((tmp_path / "run" / "stages").iterdir())]
    files = [s.tensors[LORA_FILE] for s in stages]
    downs = [k for k in files[0] if k.endswith("lora_A.weight")]
    assert downs
    for k in downs:
        a0, a1 = files[0][k], files[1][k]
        assert a0.shape == a1.shape == (5, a0.shape[1])
        assert not torch.allclose(a0, a1), f"{k}: both concepts got the same rows"
        assert torch.allclose(a0 @ a1.t(), torch.zeros(5, 5), atol=1e-5), f"{k}: the two concepts' bases are not orthogonal"
        assert torch.allclose(a0 @ a0.t(), torch.eye(5), atol=1e-5)
    # the merged model is W_0 + B_1 A_1 + B_2 A_2 (a sum, not an average)
    from cns_lightning.restore import load_run

    pipe, _ = load_run(tmp_path / "run")
    base = build_base(cfg)
    for name, lin in unet_targets(pipe.unet, "kv").items():
        w0 = dict(base.unet.named_modules())[name].weight
        d = sum(f[f"unet.{name}.lora_B.weight"] @ f[f"unet.{name}.lora_A.weight"] for f in files)
        assert torch.allclose(lin.weight, w0 + d, atol=1e-6), name
        assert d.abs().sum() > 0
    # diffusers' own loader, both stages' files fused into the base model: the same model
    merged = unet_output(pipe.unet)
    assert not torch.allclose(unet_output(base.unet), merged, atol=1e-3)
    for k, s in enumerate(stages):
        base.load_lora_weights(s.folder, adapter_name=f"concept{k + 1}")
    base.set_adapters(["concept1", "concept2"])
    assert torch.allclose(unet_output(base.unet), merged, atol=1e-5)
    base.fuse_lora(adapter_names=["concept1", "concept2"])
    base.unload_lora_weights()
    for name, lin in unet_targets(pipe.unet, "kv").items():
        assert torch.allclose(dict(base.unet.named_modules())[name].weight, lin.weight, atol=1e-6), name


def test_a_basis_too_small_for_the_sequence_fails_before_training_and_says_what_fits(tmp_path):
    # the tiny model's K/V input width is 32: rank 20 leaves room for 1 concept, the sequence has 2
    with pytest.raises(continual.RunError, match=r"method\.rank=20: .*holds 1 disjoint slices of rank 20, but the sequence has 2 concepts\. Lower method\.rank to 16"):
        _run(tmp_path, ["method.rank=20"])
    run = tmp_path / "run"
    assert not (run / "stages").exists() and not (run / "base_model.json").exists()
    _, result = _run(tmp_path, ["method.rank=16"])  # the fix it names: the same folder then runs
    assert result["status"] == "complete"


@pytest.mark.parametrize("method", ["orthogonal_adaptation", "c_lora", "mix_of_show"])
def test_rank_zero_fails_before_anything_is_written(tmp_path, method):
    dirs = [make_concept_folder(tmp_path / "data" / "teddy", n=3)]
    cfg = compose_cfg(tmp_path, [concepts_override(dirs), f"method={method}", *FAST, "~logger", "method.rank=0"])
    with pytest.raises(ConfigValueError, match=r"method\.rank=0 \(int\): expected a whole number >= 1\. .*e\.g\. method\.rank="):
        continual.run(cfg)
    assert not (tmp_path / "run").exists()
