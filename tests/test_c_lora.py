"""C-LoRA (``methods/c_lora.py``): the self-regularization penalty, and earlier adapters kept
active (peft adapters beside the new one) and frozen (never trained again) while a new one trains;
the merged model, and diffusers' loader given the stages' LoRA files, reproduce the adapted UNet."""

from __future__ import annotations

import pytest
import torch

from cns_lightning import continual
from cns_lightning.methods.c_lora import self_regularization
from peft.tuners.lora import LoraLayer

from cns_lightning.methods.lora import LORA_FILE, factors, unet_targets
from cns_lightning.preflight import ConfigValueError
from cns_lightning.restore import build_base
from cns_lightning.state import read_stage
from conftest import FAST, compose_cfg, concepts_override, make_concept_folder, unet_output


def test_self_regularization_is_the_squared_frobenius_norm_of_the_overlap():
    torch.manual_seed(0)
    past = {"a": torch.randn(4, 3), "b": torch.randn(2, 5)}
    ads = {"a": (torch.randn(2, 3), torch.randn(4, 2)), "b": (torch.randn(1, 5), torch.randn(2, 1))}
    want = sum(((past[n] * (b @ a)) ** 2).sum() for n, (a, b) in ads.items())
    assert torch.allclose(self_regularization(past, ads), want)
    # zero where the past adapters wrote nothing; negative past entries count like positive ones
    assert self_regularization({"a": torch.zeros(4, 3)}, {"a": ads["a"]}) == 0
    assert torch.allclose(self_regularization({"a": -past["a"]}, {"a": ads["a"]}), self_regularization({"a": past["a"]}, {"a": ads["a"]}))
    # its gradient reaches the new adapter only (the past is detached)
    p = past["a"].clone().requires_grad_(True)
    for q in ads["a"]:
        q.requires_grad_(True)
    self_regularization({"a": p}, {"a": ads["a"]}).backward()
    assert p.grad is None and ads["a"][1].grad.abs().sum() > 0 and ads["a"][0].grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # diffusers' loader, given a second adapter
def test_earlier_adapters_stay_active_and_frozen_while_the_next_trains(tmp_path):
    dirs = [make_concept_folder(tmp_path / "data" / n, n=3, seed=k) for k, n in enumerate(("teddy", "mug"))]
    cfg = compose_cfg(tmp_path, [concepts_override(dirs), "method=c_lora", *FAST, "~logger", "calibration.num_prompts=4",
                                 "method.lr_lora=1e-2", "method.steps=6"])
    r = continual.check_inputs(cfg)
    continual.build(r)
    continual.make_priors(r)
    continual.restore(r)
    unet = r.ctx.pipe.unet
    kv = unet_targets(unet, "kv")
    w0 = {n: lin.weight.detach().clone() for n, lin in kv.items()}
    stage = r.method.begin_stage(r.ctx, 0, r.concepts[0])
    continual.save_stage(r, 0, continual.fit_stage(r, 0, stage, []), 0.0)  # with the merge step
    folders = lambda: sorted((tmp_path / "run" / "stages").iterdir())  # noqa: E731
    first = read_stage(folders()[0]).tensors[LORA_FILE]
    stage = r.method.begin_stage(r.ctx, 1, r.concepts[1])
    modules = dict(unet.named_modules())
    for n, lin in kv.items():  # active: the model trains concept 2 on W_0 with peft adapter 1 beside the new one
        layer = modules[n]
        assert isinstance(layer, LoraLayer) and layer.active_adapters == ["c0001", "c0002"], n
        a1, b1 = factors(layer, "c0001")
        assert torch.equal(a1, first[f"unet.{n}.lora_A.weight"]) and torch.equal(b1, first[f"unet.{n}.lora_B.weight"])
        assert (b1 @ a1).abs().sum() > 0 and not a1.requires_grad and not b1.requires_grad
        assert torch.equal(lin.weight, w0[n]), n
    trained = {id(p) for p, _ in stage.trainable()}
    new = {id(q) for layer in r.method.live["unet"].values() for q in factors(layer, "c0002")}
    assert trained == new | {id(r.ctx.embeddings)}  # frozen: nothing of adapter 1 (nor W) trains
    before = {n: factors(modules[n], "c0001")[1].detach().clone() for n in kv}
    b_before = {n: factors(modules[n], "c0002")[1].detach().clone() for n in kv}
    continual.fit_stage(r, 1, stage, [])
    assert all(torch.equal(lin.weight, w0[n]) and torch.equal(factors(modules[n], "c0001")[1], before[n]) for n, lin in kv.items())
    assert any(not torch.equal(factors(modules[n], "c0002")[1], b_before[n]) for n in kv)
    assert float(stage.extra_loss(torch.device("cpu"))) > 0  # the penalty sees adapter 1 where adapter 2 writes
    adapted = unet_output(unet)
    continual.save_stage(r, 1, 6, 0.0)
    # after the merge the live UNet is a plain diffusers UNet holding W_0 + B_1 A_1 + B_2 A_2
    assert not any(isinstance(m, LoraLayer) for m in unet.modules())
    assert not any("lora" in k or "base_layer" in k for k in unet.state_dict())
    assert torch.allclose(unet_output(unet), adapted, atol=1e-5)
    # diffusers' own loader, both stages' files as two adapters on the base model: the same model
    base = build_base(cfg)
    assert not torch.allclose(unet_output(base.unet), adapted, atol=1e-3)
    for k, folder in enumerate(folders()):
        base.load_lora_weights(folder, adapter_name=f"concept{k + 1}")
    base.set_adapters(["concept1", "concept2"])
    assert torch.allclose(unet_output(base.unet), adapted, atol=1e-5)


def test_a_negative_penalty_weight_fails_before_anything_is_written(tmp_path):
    dirs = [make_concept_folder(tmp_path / "data" / "teddy", n=3)]
    cfg = compose_cfg(tmp_path, [concepts_override(dirs), "method=c_lora", *FAST, "~logger", "method.penalty_weight=-1"])
    with pytest.raises(ConfigValueError, match=r"method\.penalty_weight=-1 \(int\): expected a finite number >= 0\. .*e\.g\. method\.penalty_weight=1e6"):
        continual.run(cfg)
    assert not (tmp_path / "run").exists()
