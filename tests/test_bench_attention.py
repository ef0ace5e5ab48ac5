"""experiments/bench_attention.py: the SDPA shapes it records are the ones the UNet and VAE really call."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers.models.attention import BasicTransformerBlock

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from bench_attention import attention_shapes, time_call  # noqa: E402

from cns_lightning.models import build_random_pipeline  # noqa: E402


def test_attention_shapes_counts_one_self_and_one_cross_attention_per_transformer_block():
    torch.manual_seed(0)
    pipe = build_random_pipeline("tiny")
    blocks = [m for m in pipe.unet.modules() if isinstance(m, BasicTransformerBlock)]
    shapes = attention_shapes(pipe, torch.device("cpu"))
    unet = shapes["unet"]
    assert sum(unet.values()) == 2 * len(blocks)
    text_len = pipe.tokenizer.model_max_length
    cross = sum(n for (_, lq, lk, _), n in unet.items() if lk == text_len)
    assert cross == len(blocks)  # attn2: queries from the latent, keys from the text tokens
    assert all(lq == lk or lk == text_len for (_, lq, lk, _) in unet)  # the rest is attn1: self-attention
    assert {h for h, *_ in unet} == {b.attn1.heads for b in blocks}
    size = pipe.unet.config.sample_size
    assert max(k[1] for k in unet) == size * size  # the highest-resolution level: one token per latent pixel
    assert sum(shapes["vae"].values()) == sum(1 for m in pipe.vae.decoder.modules() if type(m).__name__ == "Attention")


def test_time_call_returns_the_median_of_positive_times():
    x = torch.randn(64, 64)
    ms = time_call(lambda: x @ x, repeats=5)
    assert ms > 0
