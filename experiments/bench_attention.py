"""Attention kernels at the shapes SD-1.5's UNet and VAE decoder really call, one SDPA backend at a time.

    python experiments/bench_attention.py [--batch 100] [--repeats 20] [--smoke]

Runs one forward of ``sd15_random``'s UNet (and one VAE decode) under a ``TorchFunctionMode`` that
records every ``scaled_dot_product_attention`` call's shapes, then times each distinct shape at
``--batch`` (the UNet's batch: 50 prior images with classifier-free guidance = 100) in bf16 with
CUDA events, under each backend that accepts it (PyTorch's default choice, cuDNN, FlashAttention-2,
memory-efficient), and checks each backend's output against the default's. Prints a table naming the
device: ms per call and per UNet forward (calls x ms), so one can see whether forcing a backend for
the UNet's attention could shorten prior-image sampling (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cns_lightning.models import build_random_pipeline  # noqa: E402

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}


class RecordSDPA(TorchFunctionMode):
    """Counts ``F.scaled_dot_product_attention`` calls by (heads, query length, key length, head dim)."""

    def __init__(self):
        super().__init__()
        self.shapes: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            self.shapes[(q.shape[-3], q.shape[-2], k.shape[-2], q.shape[-1])] += 1
        return func(*args, **kwargs)


def attention_shapes(pipe, device) -> dict[str, Counter]:
    """The SDPA shapes of one UNet forward and one VAE decode of a single latent."""
    size, dim = pipe.unet.config.sample_size, pipe.unet.config.cross_attention_dim
    x = torch.randn(1, 4, size, size, device=device)
    out = {}
    with torch.no_grad():
        with RecordSDPA() as rec:
            pipe.unet(x, torch.tensor([500], device=device), torch.randn(1, pipe.tokenizer.model_max_length, dim, device=device))
        out["unet"] = rec.shapes
        with RecordSDPA() as rec:
            pipe.vae.decode(x)
        out["vae"] = rec.shapes
    return out


def time_call(fn, repeats: int) -> float:
    """ms of ``fn``: the middle of ``repeats`` calls sorted (the upper of the two middle ones for an
    even count), after 3 untimed ones; each call timed with CUDA events (CPU: perf_counter)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=100, help="the UNet's batch (CFG: twice the images); the VAE's is --vae-batch")
    ap.add_argument("--vae-batch", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny pipeline (checks the script only)")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: run it on a GPU machine, or pass --smoke to check the script on the CPU")
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    torch.manual_seed(0)
    pipe = build_random_pipeline("tiny" if args.smoke else "sd15").to(device)
    shapes = attention_shapes(pipe, device)
    del pipe
    backends = {"default": None, **({} if args.smoke else BACKENDS)}
    print(f"\nSDPA at SD-1.5's attention shapes, {dtype}, device: {name}, torch {torch.__version__}")
    print("| model | batch x heads, q len, kv len, head dim | calls | " + " | ".join(f"{b} ms" for b in backends) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in backends) + " |")
    totals = {m: {b: 0.0 for b in backends} for m in shapes}
    for model, counter in shapes.items():
        batch = args.batch if model == "unet" else args.vae_batch
        for (heads, lq, lk, d), calls in sorted(counter.items(), key=lambda kv: -kv[0][1]):
            q = torch.randn(batch, heads, lq, d, device=device, dtype=dtype)
            k, v = (torch.randn(batch, heads, lk, d, device=device, dtype=dtype) for _ in range(2))
            ref = F.scaled_dot_product_attention(q, k, v)
            cells = []
            for b, backend in backends.items():
                try:
                    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                        err = (F.scaled_dot_product_attention(q, k, v).float() - ref.float()).abs().max().item()
                        ms = time_call(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
                except RuntimeError as e:  # "No available kernel": the backend does not take this shape
                    cells.append("n/a")
                    totals[model][b] = float("nan")
                    print(f"  ({b} at {heads}x{lq}x{lk}x{d}: {str(e).splitlines()[0][:80]})", file=sys.stderr)
                    continue
                cells.append(f"{ms:.3f}" + (f" (max diff {err:.1e})" if err > 0 else ""))
                totals[model][b] += calls * ms
            print(f"| {model} | {batch}x{heads}, {lq}, {lk}, {d} | {calls} | " + " | ".join(cells) + " |")
    for model, per in totals.items():
        print(f"| {model}: one forward | | | " + " | ".join(f"**{v:.2f}**" for v in per.values()) + " |")


if __name__ == "__main__":
    main()
