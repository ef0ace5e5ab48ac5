"""fp8 matrix products for the prior sampler: the "fp8" settings of experiments/bench_prior.py.

The token-wise linear layers of the UNet's transformer blocks (self-attention q/k/v/out,
cross-attention q/out, both feed-forward layers) become ``Fp8Linear``: weights stored once in
float8 e4m3 with one scale per output channel, activations quantised on each call with one scale
per token, the product by ``torch._scaled_mm`` (cuBLASLt's fp8 GEMM on Hopper, twice the bf16
rate) accumulating in fp32 and returning the input's dtype. Convolutions, attention itself, the
norms and cross-attention's text keys/values (77 tokens) stay in bf16. It changes the images.

Measured (docs/benchmarks.md, session 5): slower than bf16 once compiled (46.9 against 44.3 s per 200
images on an H100), so it is not a ``prior.precision`` of the package; kept here as the evidence.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448.0
# cross-attention keys/values read the text (77 tokens, small products): left in bf16
KEEP = ("attn2.to_k", "attn2.to_v")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (m, k) as e4m3 values (m, k) and fp32 scales (m, 1) with ``x ~= values * scales``:
    each row scaled so that its largest magnitude maps to e4m3's largest finite value."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def scaled_mm_fits(linear: nn.Linear) -> bool:
    """Whether ``torch._scaled_mm`` takes this layer's sizes (in and out features divisible by 16)."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


class Fp8Linear(nn.Module):
    """A frozen ``nn.Linear`` computed in fp8: rowwise-scaled weights (per output channel) and
    activations (per token), ``torch._scaled_mm``, output in the input's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if not scaled_mm_fits(linear):
            raise ValueError(f"Fp8Linear needs in/out features divisible by 16 (torch._scaled_mm), got {self.in_features}x{self.out_features}")
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)  # (out, in) row-major: .t() is the column-major operand _scaled_mm wants
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())  # (1, out)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        values, scale = quantize_rows(x.reshape(-1, self.in_features))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = torch._scaled_mm(values, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=bias, out_dtype=x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, e4m3 rowwise"


def fp8_linears(unet: nn.Module) -> list[str]:
    """Replace, in place, every ``nn.Linear`` inside the UNet's transformer blocks (names containing
    ``transformer_blocks.``) by ``Fp8Linear``, except cross-attention's ``to_k``/``to_v`` (``KEEP``)
    and layers whose sizes ``torch._scaled_mm`` cannot take. Returns the replaced layers' names."""
    replaced = []
    for name, module in list(unet.named_modules()):
        if not isinstance(module, nn.Linear) or "transformer_blocks." not in name or name.endswith(KEEP) or not scaled_mm_fits(module):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name), child, Fp8Linear(module))
        replaced.append(name)
    return replaced
