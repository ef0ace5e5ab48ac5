"""The LoRA adapter of the LoRA methods (``methods/lora.py``): its output, its removal, the sum
merge, and the stage file's diffusers key layout."""

from __future__ import annotations

import torch
from torch import nn

from cns_lightning.methods.lora import LoRA, LORA_FILE, kaiming_down, lora_file, merged_weight, text_targets, unet_targets
from cns_lightning.models import build_random_pipeline


def test_an_attached_adapter_adds_x_a_b_and_leaves_when_detached():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    x = torch.randn(3, 6)
    plain = lin(x).detach()
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    adapter = LoRA(a, b).attach(lin)
    assert "lora.lora_B" in dict(lin.named_parameters())  # in the model tree while attached
    assert torch.allclose(lin(x), plain + x @ a.t() @ b.t(), atol=1e-6)
    assert torch.allclose(lin(x), x @ merged_weight(lin.weight, [adapter.delta()]).t() + lin.bias, atol=1e-5)
    adapter.detach_from_host()
    assert torch.equal(lin(x), plain) and "lora.lora_B" not in dict(lin.named_parameters())


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
    gen = torch.Generator().manual_seed(0)
    ads = {n: LoRA(kaiming_down(2, lin.in_features, gen), torch.zeros(lin.out_features, 2)) for n, lin in kv.items()}
    tensors, meta = lora_file({"unet": ads}, 2)
    assert LORA_FILE == "pytorch_lora_weights.safetensors" and meta["rank"] == "2"
    modules = dict(pipe.unet.named_modules())
    for key, t in tensors.items():
        prefix, rest = key.split(".", 1)
        module, part = rest.rsplit(".", 2)[0], rest.rsplit(".", 2)[1]
        assert prefix == "unet" and module in modules and part in ("lora_A", "lora_B") and key.endswith(".weight"), key
        assert t.dtype == torch.float32


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
