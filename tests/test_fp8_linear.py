"""experiments/fp8_linear.py: the fp8 sampler settings of bench_prior (CPU: torch._scaled_mm runs there too)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from fp8_linear import E4M3_MAX, Fp8Linear, fp8_linears, quantize_rows  # noqa: E402

from cns_lightning.models import build_random_pipeline  # noqa: E402


def test_quantize_rows_scales_each_row_to_the_e4m3_range():
    x = torch.randn(5, 32) * torch.tensor([1e-3, 1.0, 10.0, 1e3, 0.0]).unsqueeze(1)
    values, scale = quantize_rows(x)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (5, 1) and scale.dtype == torch.float32
    peaks = values.float().abs().amax(dim=1)
    assert torch.allclose(peaks[:4], torch.full((4,), E4M3_MAX))  # the largest entry of a row maps to 448
    assert peaks[4] == 0  # an all-zero row stays zero (no division by zero)
    back = values.float() * scale
    assert torch.allclose(back[:4], x[:4], rtol=0.07, atol=0)  # e4m3: 3 mantissa bits, relative step <= 1/16


def test_fp8_linear_matches_the_linear_within_fp8_rounding():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16)
    fp8 = Fp8Linear(linear)
    x = torch.randn(2, 10, 64, dtype=torch.bfloat16)
    want, got = linear(x).float(), fp8(x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 10, 48)
    rel = (got.float() - want).norm() / want.norm()
    assert 0 < rel < 0.06  # not the bf16 result, but within fp8 rounding (measured ~0.036 at 320 -> 1280)


def test_fp8_linear_refuses_sizes_scaled_mm_cannot_take():
    with pytest.raises(ValueError, match="divisible by 16"):
        Fp8Linear(torch.nn.Linear(40, 32))


def test_fp8_linears_replaces_token_wise_transformer_linears_only():
    unet = build_random_pipeline("tiny").unet.to(torch.bfloat16)
    before = {n: type(m) for n, m in unet.named_modules()}
    replaced = fp8_linears(unet)
    assert replaced and all("transformer_blocks." in n for n in replaced)
    assert not any(n.endswith(("attn2.to_k", "attn2.to_v")) for n in replaced)  # the text keys/values stay bf16
    for name in replaced:
        assert before[name] is torch.nn.Linear and isinstance(unet.get_submodule(name), Fp8Linear)
    assert isinstance(unet.get_submodule(replaced[0].replace("attn1.to_q", "attn2.to_k")), torch.nn.Linear)
    # the UNet still runs, in bf16 out
    x = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    c = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=torch.bfloat16)
    out = unet(x, torch.tensor([10]), c).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
