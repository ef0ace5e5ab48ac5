"""C-LoRA (``methods/c_lora.py``): the self-regularization penalty, and earlier adapters kept
active (in the weights) and frozen (never trained again) while a new one trains."""

from __future__ import annotations

import pytest
import torch

from cns_lightning import continual
from cns_lightning.methods.c_lora import self_regularization
from cns_lightning.methods.lora import LORA_FILE, LoRA, unet_targets
from cns_lightning.preflight import ConfigValueError
from cns_lightning.state import read_stage
from conftest import FAST, compose_cfg, concepts_override, make_concept_folder


def test_self_regularization_is_the_squared_frobenius_norm_of_the_overlap():
    torch.manual_seed(0)
    past = {"a": torch.randn(4, 3), "b": torch.randn(2, 5)}
    ads = {"a": LoRA(torch.randn(2, 3), torch.randn(4, 2)), "b": LoRA(torch.randn(1, 5), torch.randn(2, 1))}
    want = sum(((past[n] * (a.lora_B @ a.lora_A)) ** 2).sum() for n, a in ads.items())
    assert torch.allclose(self_regularization(past, ads), want)
    # zero where the past adapters wrote nothing; negative past entries count like positive ones
    assert self_regularization({"a": torch.zeros(4, 3)}, {"a": ads["a"]}) == 0
    assert torch.allclose(self_regularization({"a": -past["a"]}, {"a": ads["a"]}), self_regularization({"a": past["a"]}, {"a": ads["a"]}))
    # its gradient reaches the new adapter only (the past is detached)
    p = past["a"].clone().requires_grad_(True)
    for q in ads["a"].parameters():
        q.requires_grad_(True)
    self_regularization({"a": p}, {"a": ads["a"]}).backward()
    assert p.grad is None and ads["a"].lora_B.grad.abs().sum() > 0 and ads["a"].lora_A.grad.abs().sum() > 0


def test_earlier_adapters_stay_active_and_frozen_while_the_next_trains(tmp_path):
    dirs = [make_concept_folder(tmp_path / "data" / n, n=3, seed=k) for k, n in enumerate(("teddy", "mug"))]
    cfg = compose_cfg(tmp_path, [concepts_override(dirs), "method=c_lora", *FAST, "~logger", "calibration.num_prompts=4",
                                 "method.lr_lora=1e-2", "method.steps=6"])
    r = continual.check_inputs(cfg)
    continual.build(r)
    continual.make_priors(r)
    continual.restore(r)
    kv = unet_targets(r.ctx.pipe.unet, "kv")
    w0 = {n: lin.weight.detach().clone() for n, lin in kv.items()}
    stage = r.method.begin_stage(r.ctx, 0, r.concepts[0])
    continual.save_stage(r, 0, continual.fit_stage(r, 0, stage, []), 0.0)  # with the merge step
    first = read_stage(sorted((tmp_path / "run" / "stages").iterdir())[0]).tensors[LORA_FILE]
    stage = r.method.begin_stage(r.ctx, 1, r.concepts[1])
    for n, lin in kv.items():  # active: the model trains concept 2 on W_0 + B_1 A_1
        d1 = first[f"unet.{n}.lora_B.weight"] @ first[f"unet.{n}.lora_A.weight"]
        assert d1.abs().sum() > 0
        assert torch.equal(lin.weight, (w0[n] + d1).to(lin.weight.dtype)), n
    trained = {id(p) for p, _ in stage.trainable()}
    new = {id(q) for a in r.method.live["unet"].values() for q in (a.lora_A, a.lora_B)}
    assert trained == new | {id(r.ctx.embeddings)}  # frozen: nothing of adapter 1 (nor W) trains
    before = {n: lin.weight.detach().clone() for n, lin in kv.items()}
    b_before = {n: a.lora_B.detach().clone() for n, a in r.method.live["unet"].items()}
    continual.fit_stage(r, 1, stage, [])
    assert all(torch.equal(lin.weight, before[n]) for n, lin in kv.items())
    assert any(not torch.equal(a.lora_B, b_before[n]) for n, a in r.method.live["unet"].items())
    assert float(stage.extra_loss(torch.device("cpu"))) > 0  # the penalty sees adapter 1 where adapter 2 writes


def test_a_negative_penalty_weight_fails_before_anything_is_written(tmp_path):
    dirs = [make_concept_folder(tmp_path / "data" / "teddy", n=3)]
    cfg = compose_cfg(tmp_path, [concepts_override(dirs), "method=c_lora", *FAST, "~logger", "method.penalty_weight=-1"])
    with pytest.raises(ConfigValueError, match=r"method\.penalty_weight=-1 \(int\): expected a finite number >= 0\. .*e\.g\. method\.penalty_weight=1e6"):
        continual.run(cfg)
    assert not (tmp_path / "run").exists()
