"""GPU speed at SD-1.5 scale (issue 5): `python experiments/bench_gpu.py` on a CUDA machine.

Builds ``sd15_random`` (the exact SD-1.5 architecture, random weights, no download) on the GPU and
runs the project's own code path (ContinualModule + the configured method + ConceptDataModule + a Lightning Trainer made from
src/cns_lightning/conf/trainer/gpu.yaml, the run's method (``begin_stage`` / ``end_stage``) and ``write_stage``). Prints one table naming the
device; writes every number to ``--out`` (bench.json).

Measured:
  * ms per training step: 512 px, 2 concept + 2 prior images per step, bf16-mixed; median of the
    steps after ``--warmup``, timed with CUDA events between consecutive batch starts (so the
    optimizer step, data loading and hooks are in it). Variants: the pre-issue-5 module
    (experiments/baseline), the current module eager, + channels-last, + torch.compile (default
    mode), + CUDA graphs (mode reduce-overhead, as src/cns_lightning/conf/trainer/gpu.yaml's SpeedUps callback);
    plus the bare UNet forward+backward (anchor row);
  * peak GPU memory of the final variant's stage;
  * wall time of whole concept stages (selection + ``--stage-steps`` steps + saving, prior images
    cached, the compiled graph warm);
  * prior-image generation throughput (``--prior-images`` at 50 steps with CFG, bf16);
  * size on disk of a 7-concept run's final state (stages 3-7 train ``--short-steps`` steps: the
    size does not depend on the step count).

``--ddp``: launch with ``torchrun --nproc_per_node=2 experiments/bench_gpu.py --ddp`` to time a
stage under src/cns_lightning/conf/trainer/ddp.yaml (``--trainer ddp_compact`` / ``ddp_masked``: those configs; one
process without torchrun: src/cns_lightning/conf/trainer/gpu.yaml), check that every rank ends with identical
weights, and time prior generation split across ranks; ``--profile N`` adds a profiler window of N
steps and lists every host-synchronising CUDA call by Python line (see docs/scaling.md).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "experiments" / "baseline"))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from cns_lightning.checkpoint import hash_tensors  # noqa: E402
from cns_lightning.concepts import concepts_from_config  # noqa: E402
from cns_lightning.continual import calibration_prompts  # noqa: E402
from cns_lightning.methods import RunContext, build_method  # noqa: E402
from cns_lightning.data import ConceptDataModule  # noqa: E402
from cns_lightning.models import build_random_pipeline, cross_attention_kv  # noqa: E402
from cns_lightning.module import ContinualModule  # noqa: E402
from cns_lightning.prior import model_fingerprint, prior_images  # noqa: E402
from cns_lightning.state import stage_dir, write_stage  # noqa: E402
from cns_lightning.tokens import add_concept_tokens  # noqa: E402

SEQ7 = ["dog_patch", "cup_heart", "cat_tabby", "style_neon", "bird_parrot", "scene_island", "car_racer"]


def seq_concepts(names: list[str], cache: Path, resolution: int = 512):
    """The micro-world concepts of seq7 (their captions and classes), with images upscaled to
    ``resolution`` (the world renders 64 px; SD-1.5 trains at 512)."""
    import dataclasses
    import shutil

    from PIL import Image

    out = []
    for c in concepts_from_config([{"name": n, "source": "microworld"} for n in names]):
        src = c.folder(str(cache))
        dst = cache / f"sd{resolution}" / c.name
        if not (dst / "metadata.jsonl").is_file():
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for f in sorted(src.glob("*.png")):
                Image.open(f).convert("RGB").resize((resolution, resolution), Image.BICUBIC).save(tmp / f.name)
            shutil.copy(src / "metadata.jsonl", tmp / "metadata.jsonl")
            shutil.rmtree(dst, ignore_errors=True)
            tmp.rename(dst)
        out.append(dataclasses.replace(c, source="folder", path=dst))
    return out


class StepTimer(L.Callback):
    """CUDA events at every batch start (and at the end): step i = start(i) -> start(i+1)."""

    def __init__(self):
        self.events: list[torch.cuda.Event] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.events.append(e)

    def on_train_end(self, trainer, pl_module):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.events.append(e)
        torch.cuda.synchronize()

    def step_ms(self, warmup: int) -> list[float]:
        ev = self.events
        return [ev[i].elapsed_time(ev[i + 1]) for i in range(warmup, len(ev) - 1)]


class StepProfile(L.Callback):
    """``--profile N``: torch.profiler over N training steps after the warm-up, on every rank; prints
    the wall time per step, every host-synchronising CUDA call by Python line, and the host-side
    ops that took the most CPU time (the device times the profiler reports count CUDA-graph
    kernels more than once, so none is printed)."""

    def __init__(self, start: int, steps: int):
        self.start, self.steps, self.prof, self.caught, self.syncs, self.t0 = start, steps, None, None, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.start:
            torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.caught = warnings.catch_warnings(record=True)
            self.syncs = self.caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")  # every host-synchronizing CUDA call, with its Python line
            self.t0 = time.perf_counter()
        elif batch_idx == self.start + self.steps and self.prof is not None:
            torch.cuda.synchronize()
            wall = (time.perf_counter() - self.t0) * 1000 / self.steps
            torch.cuda.set_sync_debug_mode(0)
            self.caught.__exit__(None, None, None)
            self.prof.__exit__(None, None, None)
            sync_sites = collections.Counter(f"{w.filename}:{w.lineno}" for w in self.syncs if "synchroniz" in str(w.message))
            print(f"[profile rank {rank()}] host syncs per step: " + (", ".join(f"{k} x{v / self.steps:g}" for k, v in sync_sites.most_common()) or "none"), flush=True)
            top = sorted(self.prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
            lines = [f"  {e.key[:60]:60s} cpu {e.self_cpu_time_total / 1000 / self.steps:7.2f} ms/step  x{e.count // self.steps}" for e in top]
            print(f"[profile rank {rank()}] wall {wall:.2f} ms/step (profiled)\n" + "\n".join(lines), flush=True)
            self.prof = None


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "src" / "cns_lightning" / "conf"), version_base=None):
        return compose("config", overrides=overrides)


def make_trainer(trainer_cfg, steps: int, out: Path, speedups: bool, extra_callbacks: list, logger: bool = True):
    """A Trainer from the config (src/cns_lightning/conf/trainer/<name>.yaml); ``speedups=False`` drops its callbacks."""
    kwargs = dict(max_steps=steps, enable_progress_bar=False, enable_model_summary=False)
    loggers = [CSVLogger(str(out / "csv"), name="bench")] if logger and rank() == 0 else False
    trainer = instantiate(trainer_cfg, logger=loggers, **({} if speedups else {"callbacks": []}), **kwargs)
    trainer.callbacks.extend(extra_callbacks)
    return trainer


def kv_digest(module) -> str:
    return hash_tensors([*module.kv().values(), module.text_encoder.get_input_embeddings().weight]).hexdigest()[:16]


def folder_bytes(folders: list[Path], names: set[str] | None = None) -> int:
    return sum(f.stat().st_size for d in folders for f in d.iterdir() if f.is_file() and (names is None or f.name in names))


def unet_only_ms(pipe, batch: int, res: int, iters: int, warmup: int) -> float:
    """The anchor's workload: UNet forward+backward, only attn2 K/V trainable, bf16 autocast."""
    unet = pipe.unet
    kv = cross_attention_kv(unet)
    for p in kv.values():
        p.requires_grad_(True)
    lat = torch.randn(batch, 4, res // 8, res // 8, device="cuda")
    cond = torch.randn(batch, 77, 768, device="cuda")
    t = torch.randint(0, 1000, (batch,), device="cuda")
    times = []
    for i in range(warmup + iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = unet(lat, t, cond, return_dict=False)[0]
        out.float().pow(2).mean().backward()
        b.record()
        times.append((a, b))
    torch.cuda.synchronize()
    for p in kv.values():
        p.grad = None
        p.requires_grad_(False)
    return statistics.median(a.elapsed_time(b) for a, b in times[warmup:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--cache", default="/tmp/cns_bench_cache")
    ap.add_argument("--variant-steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--stage-steps", type=int, default=500)
    ap.add_argument("--short-steps", type=int, default=30)
    ap.add_argument("--prior-images", type=int, default=200)
    ap.add_argument("--prior-steps", type=int, default=50)
    ap.add_argument("--prior-batch", type=int, default=50)
    ap.add_argument("--before-prior-images", type=int, default=8, help="images for the fp32 batch-8 'before' prior row (0: skip)")
    ap.add_argument("--variants", default="baseline,eager,compile_cg",
                    help="any of baseline (the module before issue 5), eager, channels_last, compile, compile_cg; one compile costs ~100 s")
    ap.add_argument("--stages", type=int, default=7)
    ap.add_argument("--ddp", action="store_true")
    ap.add_argument("--no-speedups", action="store_true", help="--ddp: eager (no torch.compile / channels-last)")
    ap.add_argument("--profile", type=int, default=0, help="--ddp: profile this many steps after the warm-up")
    ap.add_argument("--trainer", default="ddp", help="--ddp with 2+ ranks: the trainer config (ddp, ddp_compact, ddp_masked)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="--ddp: a Hydra override for the composed config, e.g. trainer.strategy.sigterm_check_every_n_steps=1 with --trainer ddp_compact (repeatable)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    results: dict = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                         argv=sys.argv, gpus=torch.cuda.device_count())
    import diffusers

    results["diffusers"] = diffusers.__version__
    if args.ddp:
        return ddp_main(args, out, cache, results)

    cfg = compose_cfg(["model=sd15_random", "trainer=gpu"])
    L.seed_everything(0, verbose=False)
    t0 = time.time()
    pipe = build_random_pipeline("sd15")
    pipe.to("cuda")
    torch.cuda.synchronize()
    results["build_s"] = round(time.time() - t0, 1)
    log(f"built sd15_random on {results['device']} in {results['build_s']} s")
    concepts = seq_concepts(SEQ7, cache)
    token_ids = add_concept_tokens(pipe.tokenizer, pipe.text_encoder, concepts)
    fingerprint = model_fingerprint(pipe)

    # ---- anchor row: bare UNet fwd+bwd
    results["unet_only_eager_ms"] = round(unet_only_ms(pipe, 4, 512, 20, 5), 2)
    log(f"bare UNet fwd+bwd eager: {results['unet_only_eager_ms']} ms")

    # ---- prior images: before (fp32, batch 8) and after (bf16 autocast, large batch)
    prompt = concepts[0].class_prompt()
    if args.before_prior_images:
        torch.cuda.synchronize()
        t0 = time.time()
        prior_images(pipe, prompt, args.before_prior_images, cache / f"before_{time.time_ns()}", seed=1, resolution=512,
                     num_inference_steps=args.prior_steps, guidance_scale=6.0, batch_size=8, fingerprint=fingerprint, precision="fp32")
        results["prior_before_img_per_s"] = round(args.before_prior_images / (time.time() - t0), 3)
        log(f"prior fp32 batch 8: {results['prior_before_img_per_s']} img/s")
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.time()
    fresh = cache / f"timed_{time.time_ns()}"  # never a cache hit: this is the timed generation
    priors = prior_images(pipe, prompt, args.prior_images, fresh, seed=0, resolution=512, num_inference_steps=args.prior_steps,
                          guidance_scale=6.0, batch_size=args.prior_batch, fingerprint=fingerprint)
    dt = time.time() - t0
    results.update(prior_images=args.prior_images, prior_steps=args.prior_steps, prior_s=round(dt, 1), prior_img_per_s=round(args.prior_images / dt, 3),
                   prior_peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    log(f"prior bf16 batch {args.prior_batch}: {args.prior_images} images in {dt:.1f} s")
    gc.collect()
    torch.cuda.empty_cache()

    # ---- step-time variants on stage 1's data
    method, ctx = method_context(cfg, pipe, concepts, token_ids, cache)
    c0 = concepts[0]
    masks0, _ = method.select(ctx, 0, c0)
    dm = ConceptDataModule(c0, pipe.tokenizer, 512, steps=args.variant_steps, batch_size=2, prior_images=priors,
                           prior_prompt=c0.class_prompt(), vae=pipe.vae, seed=0, cache_dir=str(cache))
    t0 = time.time()
    dm.setup()
    results["latent_cache_s"] = round(time.time() - t0, 1)
    kv0 = {n: p.detach().clone() for n, p in cross_attention_kv(pipe.unet).items()}
    emb0 = pipe.text_encoder.get_input_embeddings().weight.detach().clone()

    def reset() -> None:  # every variant (and the stage sequence) starts from the base model
        with torch.no_grad():
            for n, p in cross_attention_kv(pipe.unet).items():
                p.copy_(kv0[n])
            pipe.text_encoder.get_input_embeddings().weight.copy_(emb0)

    variants = {}
    for name in args.variants.split(","):
        reset()
        L.seed_everything(0, verbose=False)
        if name == "baseline":
            from module_v0 import CNSModule as Module0

            module = Module0(pipe, nan_check_every=1, log_every=10)
            module.add_masks("c01", masks0)
            module.begin_stage("c01", [token_ids[c0.name]], earlier=[])
        else:
            module = ContinualModule(pipe, nan_check_every=1, log_every=10)
            if name == "channels_last":
                module.enable_speedups(channels_last=True)
            if name == "compile":  # torch.compile, default mode
                module.enable_speedups(compile=True, channels_last=True)
            if name == "compile_cg":  # torch.compile with CUDA graphs (mode reduce-overhead: src/cns_lightning/conf/trainer/gpu.yaml)
                module.enable_speedups(compile={"mode": "reduce-overhead"}, channels_last=True)
            method.setup(ctx)
            module.begin_stage(method.begin_stage(ctx, 0, c0))
        timer = StepTimer()
        speed = name.startswith("compile")
        torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        trainer = make_trainer(cfg.trainer, args.variant_steps, out / name, speedups=speed, extra_callbacks=[timer])
        try:
            trainer.fit(module, datamodule=dm)
        except Exception as e:  # noqa: BLE001 (report and go on with the other variants)
            module.end_stage()
            variants[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            log(f"variant {name} failed: {variants[name]['error']}")
            module.to("cuda")
            continue
        wall = time.time() - t0
        module.end_stage()
        ms = timer.step_ms(args.warmup)
        first = timer.step_ms(0)[:3]
        variants[name] = dict(ms_median=round(statistics.median(ms), 2), ms_p10=round(sorted(ms)[len(ms) // 10], 2),
                              ms_p90=round(sorted(ms)[9 * len(ms) // 10], 2), first_steps_ms=[round(x) for x in first],
                              peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), fit_wall_s=round(wall, 1))
        log(f"variant {name}: {variants[name]}")
        if not name.startswith("compile"):
            del module, trainer
            gc.collect()
            torch.cuda.empty_cache()
        else:
            compiled_module = module
    results["variants"] = variants
    json.dump(results, open(out / "bench.json", "w"), indent=2)

    # ---- whole stages through the loop's steps (selection + training + saving), final config
    module = compiled_module if "compiled_module" in locals() else ContinualModule(pipe, nan_check_every=1, log_every=10)
    reset()  # the variant runs trained stage 1 already
    method.setup(ctx)
    run_dir = out / "run"
    stages = []
    for m in range(args.stages):
        c = concepts[m]
        steps = args.stage_steps if m < 2 else args.short_steps
        L.seed_everything(m, verbose=False)
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.time()
        module.begin_stage(method.begin_stage(ctx, m, c))  # selection (Eq. 3-6) + the stage's set-up
        t_sel = time.time() - t0
        masks = method.masks[m]
        dmc = ConceptDataModule(c, pipe.tokenizer, 512, steps=steps, batch_size=2, prior_images=priors,
                                prior_prompt=c0.class_prompt(), vae=pipe.vae, seed=m, cache_dir=str(cache))
        timer = StepTimer()
        trainer = make_trainer(cfg.trainer, steps, out / f"stage{m + 1}", speedups=True, extra_callbacks=[timer])
        trainer.fit(module, datamodule=dmc)
        module.end_stage()
        t_fit = time.time() - t0 - t_sel
        t1 = time.time()
        info = dict(concept=c.name, stage=m + 1, steps=trainer.global_step)
        write_stage(stage_dir(run_dir, m, c.name), method.end_stage(ctx, m, c), info)
        t_save = time.time() - t1
        ms = timer.step_ms(min(args.warmup, max(0, steps - 5)))
        stages.append(dict(stage=m + 1, steps=steps, selection_s=round(t_sel, 2), fit_s=round(t_fit, 2), save_s=round(t_save, 2),
                           total_s=round(time.time() - t0, 2), ms_median=round(statistics.median(ms), 2) if ms else None,
                           peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                           concept_entries=int(sum(int(x.sum()) for x in masks.values()))))
        log(f"stage {m + 1}: {stages[-1]}")
    results["stages"] = stages
    folders = sorted((run_dir / "stages").iterdir())
    final_files = folder_bytes(folders[-1:])  # the last stage: kv deltas of the union, its mask, its token
    earlier_masks_tokens = folder_bytes(folders[:-1], {"masks.safetensors", "token.safetensors", "stage.json", "selection.json", "manifest.json"})
    results["state"] = dict(final_state_mb=round((final_files + earlier_masks_tokens) / 1e6, 2),
                            last_kv_mb=round((folders[-1] / "kv.safetensors").stat().st_size / 1e6, 2),
                            masks_mb=round(folder_bytes(folders, {"masks.safetensors"}) / 1e6, 2),
                            run_stages_folder_mb=round(folder_bytes(folders) / 1e6, 2))
    json.dump(results, open(out / "bench.json", "w"), indent=2)
    print_table(results)


def method_context(cfg, pipe, concepts, token_ids, cache):
    """The run's method (``cfg.method``) set up on ``pipe``, as the loop builds it."""
    method = build_method(cfg.method)
    ctx = RunContext(pipe=pipe, concepts=concepts, token_ids=token_ids, cache_dir=str(cache), calibration_prompts=calibration_prompts(cfg),
                     kv_lr_scale=float(cfg.model.get("kv_lr_scale", 1.0)), token_lr_scale=float(cfg.model.get("token_lr_scale", 1.0)))
    method.setup(ctx)
    return method, ctx


def print_table(r: dict) -> None:
    v = r.get("variants", {})
    ok = {k: row for k, row in v.items() if "error" not in row}
    final = ok.get("compile_cg") or ok.get("compile") or ok.get("channels_last") or ok.get("eager") or {}
    st = r.get("stages", [])
    print()
    print(f"Device: {r['device']} (torch {r['torch']}, diffusers {r['diffusers']}), {r['date']}; command: python {' '.join(r['argv'])}")
    print("| what | measured | target |")
    print("| --- | --- | --- |")
    for name, row in v.items():
        if "error" in row:
            print(f"| ms/step, {name} | failed: {row['error'][:120]} | |")
            continue
        print(f"| ms/step, {name} (median, p10-p90) | {row['ms_median']} ({row['ms_p10']}-{row['ms_p90']}); peak {row['peak_gib']} GiB | <= 40 |")
    print(f"| bare UNet fwd+bwd eager (anchor 69 ms on H200) | {r.get('unet_only_eager_ms')} | |")
    if final:
        print(f"| peak GPU memory, final config | {final['peak_gib']} GiB | <= 10 GiB |")
    for s in st[:2]:
        print(f"| whole stage {s['stage']} ({s['steps']} steps): selection + fit + save | {s['total_s']} s "
              f"({s['selection_s']} + {s['fit_s']} + {s['save_s']}); {s['ms_median']} ms/step; peak {s['peak_gib']} GiB | <= 25 s |")
    if "prior_img_per_s" in r:
        print(f"| prior images, {r['prior_images']} at {r['prior_steps']} steps + CFG, bf16 | {r['prior_s']} s = {r['prior_img_per_s']} img/s | <= 40 s |")
    if "prior_before_img_per_s" in r:
        print(f"| prior images before (fp32, batch 8) | {r['prior_before_img_per_s']} img/s | |")
    if "state" in r:
        s = r["state"]
        print(f"| 7-concept final state (all masks + tokens + last kv) | {s['final_state_mb']} MB (last kv {s['last_kv_mb']} MB, "
              f"masks {s['masks_mb']} MB; all 7 stage folders {s['run_stages_folder_mb']} MB) | <= 10 MB |")


# ------------------------------------------------------------------------------------------- DDP
def ddp_main(args, out: Path, cache: Path, results: dict) -> None:
    """One stage under src/cns_lightning/conf/trainer/ddp.yaml (launched by torchrun), then weight equality across
    ranks; and prior generation split across ranks. Compare with a 1-GPU run of the same script."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    cfg = compose_cfg(["model=sd15_random", f"trainer={args.trainer}" if world > 1 else "trainer=gpu", *args.set])
    results["trainer"] = (args.trainer if world > 1 else "gpu") + "".join(f" {o}" for o in args.set)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl")  # Lightning reuses this group (and prior generation splits over it)
    L.seed_everything(0, verbose=False)
    pipe = build_random_pipeline("sd15")
    pipe.to(f"cuda:{local}")
    if local == 0:
        seq_concepts(SEQ7[:1], cache)  # write the images once
    if world > 1:
        dist.barrier()
    concepts = seq_concepts(SEQ7[:1], cache)
    token_ids = add_concept_tokens(pipe.tokenizer, pipe.text_encoder, concepts)
    c0 = concepts[0]
    torch.cuda.synchronize()
    t0 = time.time()
    fresh = cache / f"ddp{world}_{os.environ.get('TORCHELASTIC_RUN_ID', 'single')}"
    priors = prior_images(pipe, c0.class_prompt(), args.prior_images, fresh, seed=0, resolution=512,
                          num_inference_steps=args.prior_steps, guidance_scale=6.0, batch_size=args.prior_batch)
    torch.cuda.synchronize()
    results["prior_s"] = round(time.time() - t0, 1)
    results["prior_img_per_s"] = round(args.prior_images / (time.time() - t0), 3)
    method, ctx = method_context(cfg, pipe, concepts, token_ids, cache)
    module = ContinualModule(pipe, nan_check_every=1, log_every=10)
    module.begin_stage(method.begin_stage(ctx, 0, c0))
    dm = ConceptDataModule(c0, pipe.tokenizer, 512, steps=args.stage_steps, batch_size=2, prior_images=priors,
                           prior_prompt=c0.class_prompt(), vae=pipe.vae, seed=0, cache_dir=str(cache))
    timer = StepTimer()
    t0 = time.time()
    extra = [timer] + ([StepProfile(args.warmup + 20, args.profile)] if args.profile else [])
    trainer = make_trainer(cfg.trainer, args.stage_steps, out / f"ddp{world}", speedups=not args.no_speedups, extra_callbacks=extra)
    trainer.fit(module, datamodule=dm)
    module.end_stage()
    results["fit_s"] = round(time.time() - t0, 1)
    ms = timer.step_ms(args.warmup)
    results["ms_median"] = round(statistics.median(ms), 2)
    results["samples_per_s"] = round(4 * world * 1000 / results["ms_median"], 2)
    digest = kv_digest(module)
    digests = [None] * world
    if world > 1:
        dist.all_gather_object(digests, digest)
    else:
        digests = [digest]
    results["kv_digests"] = digests
    results["identical_across_ranks"] = len(set(digests)) == 1
    if rank() == 0:
        json.dump(results, open(out / f"ddp{world}.json", "w"), indent=2)
        print(f"DDP world={world} trainer={results['trainer']} on {results['device']}: {results['ms_median']} ms/step, {results['samples_per_s']} samples/s, "
              f"fit {results['fit_s']} s, priors {args.prior_images} in {results['prior_s']} s, identical weights: {results['identical_across_ranks']} {digests}")


if __name__ == "__main__":
    main()
