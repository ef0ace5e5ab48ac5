"""Model builders: tiny for tests, the exact SD-1.5 architecture, clear errors for bad model folders."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from cns_lightning.models import PRESETS, build_random_pipeline, check_sd_unet, cross_attention_kv, load_pipeline


def test_tiny_pipeline_has_cross_attention_kv_and_real_tokenizer():
    pipe = build_random_pipeline("tiny")
    kv = cross_attention_kv(pipe.unet)
    assert len(kv) > 0 and all(n.endswith(("to_k.weight", "to_v.weight")) for n in kv)
    assert len(pipe.tokenizer) == 49408
    for w in kv.values():
        assert w.shape[1] == pipe.text_encoder.config.hidden_size


def test_sd15_preset_is_sd15_architecture():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**PRESETS["sd15"]["unet"])
    kv = cross_attention_kv(unet)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert len(kv) == 32
    assert sum(p.numel() for p in kv.values()) == 19_169_280


def test_missing_model_folder_says_how(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path.*model_index.json"):
        load_pipeline(str(tmp_path / "nope"))


def test_not_a_cross_attention_unet():
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None, layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=32,
    )
    with pytest.raises(ValueError, match="no cross-attention"):
        check_sd_unet(unet, where="x")


def test_saved_pipeline_round_trip(tmp_path):
    pipe = build_random_pipeline("tiny")
    pipe.save_pretrained(tmp_path / "p")
    again = load_pipeline(str(tmp_path / "p"))
    a, b = cross_attention_kv(pipe.unet), cross_attention_kv(again.unet)
    assert all(torch.equal(a[n], b[n]) for n in a)
