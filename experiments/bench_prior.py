"""Prior-image generation at SD-1.5 scale: what each sampler setting gives (one GPU).

    python experiments/bench_prior.py [--images 50] [--steps 50] [--batch 50] [--final 200] [--variants ...] [--parts] [--profile 100]

Builds ``sd15_random`` (SD-1.5's architecture, random fp32 weights, as the training module holds
them) on the GPU and generates class images at 512 px with classifier-free guidance (6.0) in each
sampler setting, ``--images`` per setting after an untimed 2-step warm-up batch (cuDNN autotuning,
allocator), timed with ``torch.cuda.synchronize`` around the whole call (UNet, scheduler, VAE
decode, conversion to PIL). Then ``--final`` images end to end through ``prior.prior_images``
with the project's defaults (cold: no warm-up, PNGs written), the figure the target is about.
``--parts`` times the compiled sampler part by part (UNet forward, VAE decode, whole sample; CUDA
events), ``--profile`` one UNet forward by kernel kind.
Prints a table naming the device and writes ``bench_prior.json`` under ``--out``.

Settings:
  autocast      the sampler before this work: the fp32 pipeline under bf16 autocast
  bf16          a bf16 copy of UNet + VAE (prior.sampling_pipeline), NCHW
  bf16_cl       the same, channels-last
  bf16_cl_bench the same, cudnn.benchmark on
  bf16_cl_b100  bf16_cl at batch 100
  compile       bf16_cl + torch.compile of the UNet (first batch = compile, reported apart)
  and any "bf16" + features: see run_variant
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cns_lightning.models import build_random_pipeline  # noqa: E402
from cns_lightning.prior import DECODE_BATCH, decode_latents, model_fingerprint, prior_images, prompt_embeddings, sample_images, sampling_pipeline  # noqa: E402
from bench_attention import time_call  # noqa: E402  (experiments/, beside this script)
from fp8_linear import fp8_linears  # noqa: E402

UNET_TFLOP = 0.8033  # one SD-1.5 UNet forward of one 64x64 latent (torch.utils.flop_counter, counted on the meta device)
VAE_TFLOP = 2.5145   # one VAE decode to 512 px (same)
PROMPT = "a photo of a dog"
DEV = torch.device("cuda")
RES = 512


def log(msg: str) -> None:
    print(f"[bench_prior {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sample(pipe, sampler, n: int, steps: int, seed0: int = 0, autocast: bool = False, pipeline_decode: bool = False, pad: bool = False):
    """``pipeline_decode``: the pipeline's own VAE decode (image by image) and PIL postprocess, as the
    sampler did before ``prior.sample_images``; else ``prior.sample_images`` (what ``prior_images`` runs)."""
    g = [torch.Generator(DEV).manual_seed(seed0 + i) for i in range(n)]
    if autocast:
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            return pipe(prompt=[PROMPT] * n, num_inference_steps=steps, guidance_scale=6.0, height=RES, width=RES, generator=g).images
    cond, uncond = (e.to(sampler.unet.dtype) for e in prompt_embeddings(pipe, PROMPT, DEV))
    if pipeline_decode:
        return sampler(prompt_embeds=cond.expand(n, -1, -1), negative_prompt_embeds=uncond.expand(n, -1, -1),
                       num_inference_steps=steps, guidance_scale=6.0, height=RES, width=RES, generator=g).images
    return sample_images(sampler, cond, uncond, g, steps, 6.0, RES, pad=pad)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of uint8 images ``b`` against ``a`` (inf when identical)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def bench_sampler(pipe, precision: str, channels_last: bool = False):
    """``prior.sampling_pipeline`` in ``precision`` (not compiled); "fp8": its bf16 copy with the
    transformer linears in fp8 (experiments/fp8_linear.py)."""
    sampler = sampling_pipeline(pipe, "bf16" if precision == "fp8" else precision, channels_last=channels_last, compile=False)
    if precision == "fp8":
        fp8_linears(sampler.unet)
    return sampler


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_variant(name: str, pipe, args) -> dict:
    """``name``: "autocast", or "bf16" / "fp16" / "fp8" (a bf16 copy whose transformer linears run in fp8: experiments/fp8_linear.py) followed by any of _cl (channels-last), _bench (cudnn.benchmark),
    _b100 (batch 100), _b25, _qkv (fused QKV projections), _cudnn / _flash / _efficient (the SDPA backend tried first; then efficient, then math, for shapes it refuses),
    _compile (torch.compile of the UNet), _freeze (with Inductor's freezing), _tuned (Inductor: 1x1 convs as matmuls,
    coordinate-descent tuning), _vae (torch.compile of the VAE decoder too: what prior.compile=true does), _old (the pipeline's
    own decode, image by image, and PIL postprocess: the sampler before prior.sample_images), _ro (compile mode reduce-overhead: CUDA graphs), _mat (compile mode
    max-autotune-no-cudagraphs: GEMM and conv templates benchmarked against cuBLAS/cuDNN), _ddim (DDIM scheduler:
    50 UNet evaluations for 50 steps instead of PNDM's 51; changes the sampler, for comparison only)."""
    name = {"compile": "bf16_cl_compile"}.get(name, name)
    feats = set(name.split("_")[1:])
    batch = 100 if "b100" in feats else 25 if "b25" in feats else args.batch
    images = max(args.images, batch)
    torch.backends.cudnn.benchmark = "bench" in feats
    autocast = name == "autocast"
    if "tuned" in feats:
        import torch._inductor.config as ic

        ic.conv_1x1_as_mm = True
        ic.coordinate_descent_tuning = True
        ic.epilogue_fusion = False
    sampler = None if autocast else bench_sampler(pipe, name.split("_")[0], channels_last="cl" in feats)
    if "old" in feats:
        sampler.vae.enable_slicing()
    if "vae" in feats:
        sampler.vae.decoder.compile(fullgraph=True, dynamic=False)
    if "qkv" in feats:
        sampler.unet.fuse_qkv_projections()
    if "ddim" in feats:
        from diffusers import DDIMScheduler

        sampler.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if "compile" in feats:
        mode = "reduce-overhead" if "ro" in feats else "max-autotune-no-cudagraphs" if "mat" in feats else None
        if mode:
            sampler.unet.compile(fullgraph=True, dynamic=False, mode=mode)
        else:
            sampler.unet.compile(fullgraph=True, dynamic=False, options={"freezing": "freeze" in feats})
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    chosen = [b for k, b in backend.items() if k in feats]  # first choice; efficient then math where it refuses a shape
    fallback = [b for b in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b not in chosen]  # (the VAE's head dim 512)
    ctx = (lambda: sdpa_kernel(chosen + fallback, set_priority=True)) if chosen else (lambda: contextlib.nullcontext())
    row: dict = dict(setting=name, batch=batch, images=images)
    torch.cuda.reset_peak_memory_stats()
    kw = dict(autocast=autocast, pipeline_decode="old" in feats, pad="vae" in feats)
    with ctx():
        first = timed(lambda: sample(pipe, sampler, batch, args.steps if "compile" in feats else 2, **kw))
        if "compile" in feats:
            row["first_batch_s"] = round(first, 1)  # compile + one batch at full steps
        total, kept = 0.0, []  # kept[0]: the first batch's images (seeds 0..), for the PSNR column
        for start in range(0, images, batch):
            total += timed(lambda: kept.append(sample(pipe, sampler, min(batch, images - start), args.steps, seed0=start, **kw)))
    first = kept[0]
    row["pixels"] = torch.stack([torch.as_tensor(np.asarray(im)) for im in first]) if isinstance(first, list) else first
    row.update(s=round(total, 2), img_per_s=round(images / total, 3), s_per_200=round(200 * total / images, 1),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    sched = (sampler or pipe).scheduler
    sched.set_timesteps(args.steps)  # PNDM runs 51 UNet evaluations for 50 steps
    row["unet_evals"] = len(sched.timesteps)
    flop = images * (len(sched.timesteps) * 2 * UNET_TFLOP + VAE_TFLOP)
    row["tflops"] = round(flop / total, 1)
    sampler = None
    gc.collect()
    torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False
    if "tuned" in feats:
        ic.conv_1x1_as_mm, ic.coordinate_descent_tuning, ic.epilogue_fusion = False, False, True
    return row


WRAPPERS = ("## ", "Torch-Compiled Region", "CompiledFunction", "TorchDynamo", "Pregraph")  # profiler annotations


def kernel_kind(name: str) -> str:
    """A CUDA kernel's kind from its name (cuDNN, cuBLAS and Inductor's Triton kernels)."""
    n = name.lower()
    if n.startswith(("triton_poi", "triton_red", "triton_per")):  # Inductor's fused kernels ("fused_convolution_..."
        return "fused pointwise (Triton)" if n.startswith("triton_poi") else "norm/reduction"  # is a conv's bias + norm)
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(k in n for k in ("conv", "fprop", "implicit", "dgrad", "wgrad")):
        return "conv"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "matmul", "triton_tem", "mm_")):
        return "gemm"
    if "norm" in n:
        return "norm/reduction"
    if any(k in n for k in ("nchw", "nhwc", "transpose", "copy", "layout")):
        return "layout copies"
    return "elementwise/other"


def unet_inputs(unet, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random bf16 latents, timestep 500 and 77-token text states: one UNet forward at ``batch``."""
    size, dim = unet.config.sample_size, unet.config.cross_attention_dim
    x = torch.randn(batch, 4, size, size, device=DEV, dtype=torch.bfloat16)
    c = torch.randn(batch, 77, dim, device=DEV, dtype=torch.bfloat16)
    return x, torch.full((batch,), 500, device=DEV), c


def profile_unet(pipe, batch: int, compiled: bool = False, precision: str = "bf16") -> list[tuple[str, float]]:
    """GPU time of one UNet forward (``precision``: bf16, fp16, or fp8 = bf16 with fp8 linears) at ``batch`` (CFG doubles the images), by kernel kind;
    ``compiled``: after ``torch.compile`` (as the _compile variants: fullgraph, static shapes)."""
    from torch.profiler import ProfilerActivity, profile

    unet = bench_sampler(pipe, precision).unet
    if compiled:
        unet.compile(fullgraph=True, dynamic=False)
    x, t, c = unet_inputs(unet, batch)
    with torch.no_grad():
        for _ in range(2):
            unet(x, t, c)
        torch.cuda.synchronize()
        cuda = DEV.type == "cuda"
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            unet(x, t, c)
            torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    def ms(e) -> float:
        return (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3

    for e in prof.key_averages():
        if ms(e) == 0 or e.key.startswith(WRAPPERS):
            continue  # annotations around kernels: their kernels are counted by name
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + ms(e)
    top = sorted(((f"[{kernel_kind(e.key)}] {e.key[:90]}", ms(e)) for e in prof.key_averages() if ms(e) and not e.key.startswith(WRAPPERS)),
                 key=lambda r: -r[1])[:16]
    return sorted(kinds.items(), key=lambda r: -r[1]), top


def time_parts(pipe, args) -> list[tuple[str, float]]:
    """Where compiled sampling (``prior.compile=true``) spends its time, in s per 200 images: one UNet
    forward at twice ``--batch`` (CFG) times the scheduler's evaluations, the VAE decoder at each of
    ``--decode-batches`` latents (NCHW and channels-last), and one whole ``sample`` of ``--batch`` images."""
    compiled = DEV.type == "cuda"  # --smoke: eager
    sampler = bench_sampler(pipe, "bf16")
    if compiled:  # --parts-cudagraphs: the UNet with CUDA graphs (compile mode reduce-overhead)
        sampler.unet.compile(fullgraph=True, dynamic=False, mode="reduce-overhead" if args.parts_cudagraphs else None)
        sampler.vae.decoder.compile(fullgraph=True, dynamic=False)
    size, b = sampler.unet.config.sample_size, args.batch
    sampler.scheduler.set_timesteps(args.steps)
    evals = len(sampler.scheduler.timesteps)
    x, t, c = unet_inputs(sampler.unet, 2 * b)
    rows = []
    with torch.no_grad():
        def forward():
            if args.parts_cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            return sampler.unet(x, t, c)

        ms = time_call(forward, repeats=10)
        graphs = ", CUDA graphs" if args.parts_cudagraphs else ""
        rows.append((f"UNet forward{graphs}, batch {2 * b} ({ms:.1f} ms) x {evals} evaluations", ms * evals * 200 / b / 1e3))
        for cl in (False, True):
            vae = bench_sampler(pipe, "bf16", channels_last=cl).vae if cl else sampler.vae
            if cl and compiled:
                vae.decoder.compile(fullgraph=True, dynamic=False)
            for n in (int(v) for v in args.decode_batches.split(",")):
                z = torch.randn(n, 4, size, size, device=DEV, dtype=torch.bfloat16)
                if cl:
                    z = z.contiguous(memory_format=torch.channels_last)
                ms = time_call(lambda: decode_latents(vae, z, n), repeats=3)
                rows.append((f"VAE decode + uint8 pixels, {n} latents at once{', channels-last' if cl else ''} ({ms:.1f} ms)", ms * 200 / n / 1e3))
            vae = None
            gc.collect()
            torch.cuda.empty_cache()
    sample(pipe, sampler, b, args.steps, pad=True)  # untimed: the whole call once warm (its shapes are compiled above)
    total = timed(lambda: sample(pipe, sampler, b, args.steps, pad=True))
    rows.append((f"whole sample of {b} images (prior.sample_images, decode {DECODE_BATCH} at a time)", total * 200 / b))
    return rows


def batch_sizes(text: str) -> str:
    """--decode-batches: comma-separated whole numbers >= 1."""
    if not all(v.strip().isdigit() and int(v) >= 1 for v in text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated whole numbers >= 1, e.g. 10,25,50")
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--final", type=int, default=200, help="images end to end through prior_images (0: skip)")
    ap.add_argument("--final-compile", action="store_true", help="the end-to-end row with prior.compile on")
    ap.add_argument("--variants", default="autocast,bf16,bf16_cl,bf16_cl_bench,bf16_cl_b100,compile")
    ap.add_argument("--out", default="bench_prior_out")
    ap.add_argument("--profile", type=int, default=0, help="profile one bf16 UNet forward at this batch (0: skip)")
    ap.add_argument("--profile-compiled", action="store_true", help="--profile: also the torch.compile'd UNet")
    ap.add_argument("--profile-precision", default="bf16", help="--profile: the sampler's precision (bf16, fp16, fp8)")
    ap.add_argument("--parts", action="store_true", help="time the compiled sampler's parts (UNet forward, VAE decode, whole sample)")
    ap.add_argument("--parts-cudagraphs", action="store_true", help="--parts: the UNet compiled with CUDA graphs (mode reduce-overhead)")
    ap.add_argument("--decode-batches", type=batch_sizes, default="10,25,50", help="--parts: the VAE decoder's batch sizes to time")
    ap.add_argument("--smoke", action="store_true", help="run on the CPU with the tiny pipeline (checks the script only)")
    ap.add_argument("--cache", default="/tmp/cns_bench_prior")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: run it on a GPU machine, or pass --smoke to check the script on the CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import diffusers

    res: dict = dict(device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", torch=torch.__version__, diffusers=diffusers.__version__,
                     date=time.strftime("%Y-%m-%d"), argv=sys.argv, rows=[])
    global DEV, RES
    if args.smoke:  # a CPU run of the script's code on the tiny pipeline (numbers meaningless)
        DEV, RES = torch.device("cpu"), 32
        torch.cuda.synchronize = lambda: None
        torch.cuda.reset_peak_memory_stats = lambda: None
        torch.cuda.max_memory_allocated = lambda: 0
        torch.cuda.get_device_name = lambda i=0: "cpu (smoke)"
        res["device"] = "cpu (smoke)"
    torch.manual_seed(0)
    pipe = build_random_pipeline("tiny" if args.smoke else "sd15").to(DEV)
    log(f"sd15_random on {res['device']}")

    def save():
        (out / "bench_prior.json").write_text(json.dumps(res, indent=1))

    if args.final:
        fp = model_fingerprint(pipe)
        torch.cuda.reset_peak_memory_stats()
        t = timed(lambda: prior_images(pipe, PROMPT, args.final, Path(args.cache) / str(time.time_ns()), seed=0, resolution=RES,
                                       num_inference_steps=args.steps, guidance_scale=6.0, batch_size=args.batch, fingerprint=fp,
                                       compile=args.final_compile))
        res["final"] = dict(images=args.final, s=round(t, 1), img_per_s=round(args.final / t, 3), batch=args.batch,
                            compile=args.final_compile, peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        log(f"end to end: {res['final']}")
        save()
    if args.parts:
        res["parts"] = time_parts(pipe, args)
        print(f"\nCompiled sampler (prior.compile=true) by part, bf16, {args.steps} steps, CFG; device: {res['device']}")
        print("| part | s per 200 images |\n| --- | --- |")
        for what, sec in res["parts"]:
            print(f"| {what} | {sec:.2f} |")
        save()
    for compiled in ([False, True] if args.profile_compiled else [False]) if args.profile else []:
        what = "compiled" if compiled else "eager"
        kinds, top = profile_unet(pipe, args.profile, compiled, args.profile_precision)
        res[f"profile_{what}"] = dict(batch=args.profile, ms_by_kind=kinds, top_kernels=top)
        total = sum(v for _, v in kinds)
        print(f"\nOne {args.profile_precision} UNet forward, batch {args.profile}, {what} NCHW: {total:.1f} ms of GPU time "
              f"({args.profile * UNET_TFLOP / total * 1e3:.0f} TFLOP/s)")
        for k, v in kinds:
            print(f"  {k:26s} {v:8.1f} ms  {100 * v / total:5.1f} %")
        for k, v in top:
            print(f"    {v:8.1f} ms  {k}")
        save()
    ref = None
    for name in filter(None, args.variants.split(",")):
        try:
            row = run_variant(name, pipe, args)
        except Exception as e:  # one failing setting must not lose the others' rows
            row = dict(setting=name, error=f"{type(e).__name__}: {e}"[:300])
        pixels = row.pop("pixels", None)
        if pixels is not None:  # the first batch's images (seeds 0..), against the first setting's: how far the samples moved
            ref = pixels if ref is None else ref
            n = min(len(ref), len(pixels))
            row["psnr_vs_first_db"] = round(psnr(ref[:n], pixels[:n]), 2)
        res["rows"].append(row)
        log(str(row))
        save()

    print(f"\nPrior-image generation, sd15_random, 512 px, {args.steps} steps, CFG 6.0; device: {res['device']}, torch {res['torch']}")
    print("| setting | batch | images | s | img/s | s per 200 | TFLOP/s (UNet+VAE) | peak GiB | first batch (compile) | PSNR vs first setting (dB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in res["rows"]:
        if "error" in r:
            print(f"| {r['setting']} | failed: {r['error']} |")
            continue
        print(f"| {r['setting']} | {r['batch']} | {r['images']} | {r['s']} | {r['img_per_s']} | {r['s_per_200']} | {r['tflops']} | "
              f"{r['peak_gib']} | {r.get('first_batch_s', '')} | {r.get('psnr_vs_first_db', '')} |")
    if "final" in res:
        f = res["final"]
        print(f"\nEnd to end, prior.prior_images (bf16 copy, compile={f['compile']}), cold, PNGs written: "
              f"{f['images']} images in {f['s']} s = {f['img_per_s']} img/s, peak {f['peak_gib']} GiB (target <= 40 s for 200)")
    save()


if __name__ == "__main__":
    main()
