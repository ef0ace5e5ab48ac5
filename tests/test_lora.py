"""The LoRA adapters of the LoRA methods (``methods/lora.py``): peft's layers, their output, their
removal (a plain model again), the sum merge, and the stage file in diffusers' key layout."""

from __future__ import annotations

import json

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from cns_lightning.methods.lora import (
    ADAPTER_METADATA_KEY, LORA_FILE, activate, adapter_name, adapter_state, add_adapter, factors, lora_config, lora_file,
    merged_weight, remove_adapters, set_factors, text_targets, unet_targets,
)
from cns_lightning.models import build_random_pipeline


def test_an_injected_adapter_is_peft_s_adds_x_a_b_and_leaves_when_removed():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(6, 5))
    lin = model.proj
    x = torch.randn(3, 6)
    plain = model(x).detach()
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    rng = torch.random.get_rng_state()
    layers = add_adapter(model, ["proj"], 2, "c0001")
    assert torch.equal(torch.random.get_rng_state(), rng)  # peft's own init does not move the run's random stream
    assert isinstance(model.proj, LoraLayer) and model.proj.get_base_layer() is lin and layers["proj"] is model.proj
    set_factors(layers, "c0001", {"proj": (a, b)})
    activate(model, ["c0001"])
    pa, pb = factors(model.proj, "c0001")
    assert pa.dtype == pb.dtype == torch.float32 and not pa.requires_grad and not pb.requires_grad  # frozen until a stage trains them
    assert "proj.lora_B.c0001.weight" in dict(model.named_parameters())  # in the model tree while attached
    assert torch.allclose(model(x), plain + x @ a.t() @ b.t(), atol=1e-6)
    assert torch.allclose(model(x), x @ merged_weight(lin.weight, [b @ a]).t() + lin.bias, atol=1e-5)
    # a second adapter, active with the first: both add their outputs
    a2, b2 = torch.randn(2, 6), torch.randn(5, 2)
    set_factors(add_adapter(model, ["proj"], 2, "c0002"), "c0002", {"proj": (a2, b2)})
    activate(model, ["c0001", "c0002"])
    assert model.proj.active_adapters == ["c0001", "c0002"]
    assert torch.allclose(model(x), plain + x @ a.t() @ b.t() + x @ a2.t() @ b2.t(), atol=1e-5)
    assert set(adapter_state(model, "c0002")) == {"proj.lora_A.weight", "proj.lora_B.weight"}
    assert torch.equal(adapter_state(model, "c0002")["proj.lora_A.weight"], a2)
    remove_adapters(model)
    assert model.proj is lin and torch.equal(model(x), plain)
    assert list(model.state_dict()) == ["proj.weight", "proj.bias"] and not hasattr(model, "peft_config")


def test_adapter_names_are_never_part_of_one_another():
    names = [adapter_name(m) for m in range(200)]
    assert names[0] == "c0001" and len(set(names)) == 200
    assert not any(a in b for a in names for b in names if a != b)


def test_merged_weight_is_the_base_plus_every_delta():
    w = torch.randn(4, 3)
    d1, d2 = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.allclose(merged_weight(w, [d1, d2]), w + d1 + d2)
    assert torch.equal(merged_weight(w, []), w)


def test_targets_and_the_stage_file_use_diffusers_module_names():
    pipe = build_random_pipeline("tiny")
    kv = unet_targets(pipe.unet, "kv")
    att = unet_targets(pipe.unet, "attention")
    assert kv and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in kv)
    assert set(kv) < set(att) and any(n.endswith("attn1.to_q") for n in att) and any(n.endswith("attn2.to_out.0") for n in att)
    text = text_targets(pipe.text_encoder)
    assert text and all(".self_attn." in n for n in text)
    layers = add_adapter(pipe.unet, list(kv), 2, "c0001")
    assert all(isinstance(m, LoraLayer) for m in layers.values())
    assert unet_targets(pipe.unet, "kv") == kv  # while wrapped: the same (original) linears, under the same names
    tensors, meta = lora_file({"unet": adapter_state(pipe.unet, "c0001")}, {"unet": lora_config(2, list(kv))}, 2)
    assert LORA_FILE == "pytorch_lora_weights.safetensors" and meta["rank"] == "2" and meta["alpha"] == "2"
    adapters = json.loads(meta[ADAPTER_METADATA_KEY])
    assert adapters["unet.r"] == adapters["unet.lora_alpha"] == 2 and adapters["unet.target_modules"] == sorted(kv)
    modules = dict(build_random_pipeline("tiny").unet.named_modules())
    assert len(tensors) == 2 * len(kv)
    for key, t in tensors.items():
        prefix, rest = key.split(".", 1)
        module, part = rest.rsplit(".", 2)[0], rest.rsplit(".", 2)[1]
        assert prefix == "unet" and module in modules and part in ("lora_A", "lora_B") and key.endswith(".weight"), key
        assert t.dtype == torch.float32
    remove_adapters(pipe.unet)
    assert not any("lora" in k or "base_layer" in k for k in pipe.unet.state_dict())


def test_a_stage_that_trains_the_text_encoder_gets_no_cached_prior_embedding():
    from cns_lightning.methods.lora import LoRAStage
    from cns_lightning.module import ContinualModule

    pipe = build_random_pipeline("tiny")
    module = ContinualModule(pipe)
    emb = pipe.text_encoder.get_input_embeddings().weight
    ids = torch.full((2, 77), 7, dtype=torch.long)  # one prior prompt, no trainable token
    for trains, cached in ((False, True), (True, False)):
        module.begin_stage(LoRAStage(key="c01", token_ids=[1], groups=[], embeddings=emb, lr_token=0.1, trains_text_encoder=trains))
        batch = module.on_before_batch_transfer({"prior_input_ids": ids.clone()})
        assert ("prior_text_key" in batch) == cached, f"trains_text_encoder={trains}"
    module.end_stage()
