"""CPU speed of the shipped micro pipeline (the budgets of the 15-minute main job).

    python -m cns_lightning.microworld.bench [--threads 2] [--repeats 10]

Prints a table naming the device: the UNet training step (batch 4 at 64 px, forward + backward +
Adam step, only cross-attention K/V trainable), the full step (plus VAE encode and the text encoder
with a trainable token-embedding row), and sampling 8 images with 25 PNDM steps and classifier-free
guidance through the plain ``StableDiffusionPipeline`` call. Medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def _median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--model", default=None, help="a micro pipeline folder (default: the shipped one)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from ..models import cross_attention_kv
    from .assets import micro_pipeline

    pipe = micro_pipeline(a.model)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, te):
        m.requires_grad_(False)
    kv = list(cross_attention_kv(unet).values())
    for p in kv:
        p.requires_grad_(True)
    emb = te.get_input_embeddings().weight
    emb.requires_grad_(True)
    opt = torch.optim.Adam([{"params": kv, "lr": 3e-5}, {"params": [emb], "lr": 5e-4}])
    g = torch.Generator().manual_seed(0)
    img = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    ids = tok(["a large red star on the left, on a sand background"] * 4, padding="max_length", max_length=77, return_tensors="pt").input_ids
    t = torch.randint(0, 1000, (4,), generator=g)
    with torch.no_grad():
        lat0 = vae.encode(img).latent_dist.sample(g) * vae.config.scaling_factor
        h0 = te(ids).last_hidden_state

    def unet_step():
        noise = torch.randn(lat0.shape, generator=g)
        loss = (unet(lat0 + noise, t, h0).sample - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def full_step():
        with torch.no_grad():
            lat = vae.encode(img).latent_dist.sample(g) * vae.config.scaling_factor
        h = te(ids).last_hidden_state
        noise = torch.randn(lat.shape, generator=g)
        loss = (unet(lat + noise, t, h).sample - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sample8():
        with torch.no_grad():
            pipe(["a small blue dog on the left, on a grass background"] * 8, num_inference_steps=25, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="np")

    _median_ms(full_step, 3)  # warm both paths (allocator, oneDNN primitives) before timing
    rows = [
        ("UNet train step, batch 4, K/V trainable", _median_ms(unet_step, a.repeats, warmup=5), 60),
        ("full step: VAE encode + text (token grad) + UNet, batch 4", _median_ms(full_step, a.repeats), None),
        ("sample 8 images, 25 PNDM steps, CFG (pipeline call)", _median_ms(sample8, max(3, a.repeats // 3), 1), 3000),
    ]
    device = f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"device: {device}")
    print(f"{'what':60s} {'median ms':>10s} {'budget ms':>10s}")
    for name, ms, budget in rows:
        print(f"{name:60s} {ms:10.1f} {budget if budget else '-':>10}")


if __name__ == "__main__":
    main()
