"""A whole study's time outside the training step: evaluation, the sampler, compile (issue 18).

    python experiments/bench_study.py model=sd15_random trainer=gpu          # one GPU (the lead's command: docs/benchmarks.md)
    python experiments/bench_study.py model=tiny trainer=cpu --images 4 --steps 2 --table1-images 4 --train-steps 3   # CPU smoke

Any argument without ``--`` is a Hydra override of the project's config (conf/), as on the
command line of ``python -m cns_lightning``. Builds the model once and measures, in one process:

  (a) the prior sampler (``prior.prior_images``) and the evaluation (``ContinualEvaluator.generate``)
      sampling the same number of images at the same steps and batch with ONE ``sampling.Sampler``
      (``--sampler``: eager | compile | regional; its compile is timed apart, first batch untimed);
  (b) one evaluation after a stage at the run's ``eval`` settings (stage 1, then stage 7 with all
      7 concepts learned), CLIP scoring and files included, as the loop calls it;
  (c) the paper's Table-1 protocol for one 7-concept set: 35 single-concept and 7 multi-concept
      prompts, best of 50 samples each (2,100 images), 50 steps, CFG, CLIP scoring (a ViT-B/32-shaped
      CLIP with random weights on a GPU: the same compute as the real one; the tiny CLIP on a CPU);
      ``--table1-images`` of them are run and timed, the whole protocol's seconds are projected;
  (d) compile: for each ``--compile-variants`` (full = ``torch.compile`` of the UNet's training step,
      regional = only its repeated transformer blocks) a fresh process trains ``--train-steps``
      steps twice, on an empty Inductor cache (cold) and again on the cache the first left (warm):
      the first step's seconds (compile + CUDA-graph capture), the compiler's own seconds
      (``phases.compile_seconds``) and the median step after ``--warmup`` steps.

Prints a table naming the device; writes every number to ``--out``/bench_study.json (after each
part, so a run stopped by a time limit keeps what it measured). On one H200 the defaults are
meant to fit in 10 minutes; ``--parts a,b,c`` and ``--parts d`` split it in two calls.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "experiments"))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

import cns_lightning.__main__  # noqa: E402,F401  (registers the config's ${micro_asset:...} resolver)

from cns_lightning.evaluation import ContinualEvaluator  # noqa: E402
from cns_lightning.evaluation.prompts import multi_prompts, single_prompts, zero_shot  # noqa: E402
from cns_lightning.phases import compile_seconds  # noqa: E402
from cns_lightning.prior import model_fingerprint, prior_images  # noqa: E402
from cns_lightning.sampling import Sampler  # noqa: E402
from cns_lightning.speedups import use_compile_cache  # noqa: E402
from cns_lightning.tokens import add_concept_tokens  # noqa: E402

SEQ7 = ["dog_patch", "cup_heart", "cat_tabby", "style_neon", "bird_parrot", "scene_island", "car_racer"]
TABLE1 = dict(single=35, multi=7, samples=50, steps=50)  # one 7-concept set: 42 prompts x best of 50 = 2,100 images


def log(msg: str) -> None:
    print(f"[bench_study {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "src" / "cns_lightning" / "conf"), version_base=None):
        return compose("config", overrides=overrides)


def device_of(cfg) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def build(cfg, cache: Path):
    """The base pipeline on its device with the seq7 concepts' tokens (micro-world concepts, images
    at the model's resolution)."""
    from bench_gpu import seq_concepts

    device = device_of(cfg)
    L.seed_everything(0, verbose=False)
    (pipe, seconds) = timed(lambda: instantiate(cfg.model).to(device), device)
    concepts = seq_concepts(SEQ7, cache, int(cfg.data.resolution))
    token_ids = add_concept_tokens(pipe.tokenizer, pipe.text_encoder, concepts)
    return pipe, concepts, token_ids, device, seconds


def vit_b32_clip(device: torch.device):
    """A CLIP with ViT-B/32's architecture (transformers' default ``CLIPConfig``) and random weights:
    the compute of the protocol's CLIP scoring, with no download."""
    from transformers import CLIPConfig, CLIPModel

    from cns_lightning.evaluation.metrics import ClipScorer
    from cns_lightning.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=dict(vocab_size=len(tok)))).eval()
    return ClipScorer(model=model, tokenizer=tok, image_size=224, name="random-vit-b-32").to(device)


def make_sampler(kind: str, cfg) -> Sampler:
    if kind not in ("eager", "compile", "regional"):
        raise SystemExit(f"error: --sampler={kind!r}: choose eager, compile or regional")
    return Sampler(str(cfg.prior.precision), compile=kind != "eager", regional=kind == "regional")


# ----------------------------------------------------------------------------------- (a)
def part_a(args, cfg, pipe, concepts, device, sampler, cache: Path) -> dict:
    """Prior sampler vs evaluation, same images, steps, batch and sampler."""
    steps, batch, res = args.steps, int(cfg.prior.batch_size), int(cfg.data.resolution)
    fp = model_fingerprint(pipe)
    prompt = concepts[0].class_prompt()
    kw = dict(resolution=res, num_inference_steps=steps, guidance_scale=float(cfg.prior.guidance_scale), batch_size=batch,
              fingerprint=fp, sampler=sampler)
    c0 = compile_seconds()
    _, first = timed(lambda: prior_images(pipe, prompt, batch, cache / f"warm_{time.time_ns()}", seed=99, **kw), device)
    row = dict(sampler=args.sampler, precision=sampler.runs_in(device)[0], steps=steps, batch=batch, images=args.images,
               first_batch_s=round(first, 2), sampler_compile_s=round(compile_seconds() - c0, 2))
    _, prior_s = timed(lambda: prior_images(pipe, prompt, args.images, cache / f"timed_{time.time_ns()}", seed=0, **kw), device)
    per_prompt = min(batch, args.images)  # images per prompt: the evaluation samples args.images too
    ev = ContinualEvaluator(n_images=per_prompt, num_inference_steps=steps, guidance_scale=float(cfg.prior.guidance_scale),
                            resolution=res, batch_size=batch, precision=sampler.precision, compile=sampler.compile,
                            regional_compile=sampler.regional, enabled=True)
    assert ev.use_sampler(sampler), "the evaluator must take the prior sampler (same settings)"
    prompts = [single_prompts(c, 1)[0].generate for c in concepts]
    n_prompts = max(1, args.images // per_prompt)
    _, eval_s = timed(lambda: ev.generate(pipe, (prompts * n_prompts)[:n_prompts]), device)
    n_eval = n_prompts * per_prompt
    row.update(prior_s=round(prior_s, 2), prior_img_s=round(args.images / prior_s, 3), eval_images=n_eval, eval_s=round(eval_s, 2),
               eval_img_s=round(n_eval / eval_s, 3))
    row["eval_over_prior"] = round(row["eval_img_s"] / row["prior_img_s"], 3)
    return row


# ----------------------------------------------------------------------------------- (b)
def part_b(args, cfg, pipe, concepts, device, sampler, out: Path) -> list[dict]:
    """One evaluation after a stage at the run's eval settings, as the loop calls it, for each
    ``--eval-batches`` (images per pipeline call; the first is the config's)."""
    batches = [int(b) for b in (args.eval_batches or str(cfg.eval.batch_size)).split(",") if b]
    return [part_b_one(cfg, pipe, concepts, device, sampler, out, b) for b in batches]


def part_b_one(cfg, pipe, concepts, device, sampler, out: Path, batch: int) -> dict:
    ev = instantiate(cfg.eval, batch_size=batch)
    run_dir = out / f"eval_run_b{batch}"
    shutil.rmtree(run_dir, ignore_errors=True)
    ev.setup(run_dir, concepts, device)
    shared = ev.use_sampler(sampler)
    _, base_s = timed(lambda: ev.before_training(pipe), device)
    _, s1 = timed(lambda: ev.after_stage(pipe, 1, concepts[:1]), device)
    _, s7 = timed(lambda: ev.after_stage(pipe, 7, concepts), device)
    ev.write_report = False  # where the time goes: the same evaluation without report.md and its figures
    _, s7_plain = timed(lambda: ev.after_stage(pipe, 7, concepts), device)

    def images(t: int) -> int:  # what after_stage(t) samples
        prompts = sum(len(single_prompts(c, ev.max_prompts)) for c in concepts[:t]) + len(zero_shot(ev.zero_shot_prompts, ev.max_prompts))
        return prompts * ev.n_samples

    return dict(settings=f"{ev.n_samples} samples x (concepts' prompts + zero-shot), {ev.num_inference_steps} steps, batch {ev.batch_size}, "
                         f"max_prompts {ev.max_prompts}, CLIP {ev.clip.name}",
                sampler="shared with (a)" if shared else f"its own ({ev.sampler.settings()})",
                batch=batch, base_s=round(base_s, 2), stage1_s=round(s1, 2), stage7_s=round(s7, 2), stage7_no_report_s=round(s7_plain, 2),
                stage1_images=images(1), stage7_images=images(7))


# ----------------------------------------------------------------------------------- (c)
def part_c(args, cfg, pipe, concepts, device, sampler, out: Path) -> dict:
    """The Table-1 protocol for one 7-concept set, ``--table1-images`` of its 2,100 images."""
    clip = vit_b32_clip(device) if device.type == "cuda" else None
    batch = int(args.table1_batch or cfg.prior.batch_size)  # default: the sampler's compiled shape from (a)
    samples = min(TABLE1["samples"], args.table1_images)
    n_prompts = max(1, min(TABLE1["single"] + TABLE1["multi"], args.table1_images // samples))
    steps = TABLE1["steps"] if device.type == "cuda" else args.steps  # a CPU smoke run: --steps
    ev = ContinualEvaluator(n_images=samples, best_of=samples, num_inference_steps=steps,
                            guidance_scale=float(cfg.eval.guidance_scale), max_prompts=None, batch_size=batch,
                            resolution=int(cfg.data.resolution), precision=sampler.precision, compile=sampler.compile,
                            regional_compile=sampler.regional)
    ev.setup(out / "table1_run", concepts, device)
    if clip is not None:
        ev.clip = clip
    if batch == int(cfg.prior.batch_size) or not sampler.compile:
        ev.use_sampler(sampler)
    else:  # another batch would recompile (75 s on an H200): the same precision, eager
        ev.sampler = Sampler(sampler.precision)
    single = [p for c in concepts for p in single_prompts(c, None)][: TABLE1["single"]]
    multi = [multi_prompts(a, b, ev.multi_templates, 1)[0] for a, b in zip(concepts, concepts[1:] + concepts[:1])][: TABLE1["multi"]]
    prompts = single + multi
    chosen = prompts[:n_prompts]

    def protocol():
        emb, _ = ev.sample_and_embed(pipe, [p.generate for p in chosen], list(range(len(chosen))))
        return ev.score_embeddings(chosen, emb)

    _, seconds = timed(protocol, device)
    images = n_prompts * ev.n_samples
    total = TABLE1["single"] + TABLE1["multi"]
    return dict(batch=batch, sampler=ev.sampler.settings(), prompts_available=len(prompts), prompts=n_prompts, samples=ev.n_samples, images=images, steps=ev.num_inference_steps,
                seconds=round(seconds, 2), img_s=round(images / seconds, 3), clip=ev.clip.name,
                projected_2100_s=round(seconds / images * total * TABLE1["samples"], 1))


# ----------------------------------------------------------------------------------- (d)
def child_train(args, overrides: list[str]) -> None:
    """One fresh process: ``--train-steps`` steps of a CNS stage with the trainer config's speed-ups
    (``--child-train full|regional``); prints one JSON line."""
    from bench_gpu import StepTimer  # CUDA events at every batch start

    from cns_lightning.continual import calibration_prompts
    from cns_lightning.data import ConceptDataModule
    from cns_lightning.methods import RunContext, build_method
    from cns_lightning.module import ContinualModule

    cache = Path(args.cache)
    t_start = time.perf_counter()
    cfg = compose_cfg(overrides)
    from omegaconf import open_dict

    with open_dict(cfg):  # the trainer's SpeedUps callback (trainer=gpu): whole UNet or its repeated blocks
        for cb in cfg.trainer.get("callbacks") or []:
            if str(cb.get("_target_", "")).endswith("speedups.SpeedUps"):
                cb.regional = args.child_train == "regional"
    pipe, concepts, token_ids, device, build_s = build(cfg, cache)
    c0, res = concepts[0], int(cfg.data.resolution)
    priors = prior_images(pipe, c0.class_prompt(), 4, cache, resolution=res, num_inference_steps=2, batch_size=4)
    method = build_method(cfg.method)
    ctx = RunContext(pipe=pipe, concepts=concepts, token_ids=token_ids, cache_dir=str(cache), calibration_prompts=calibration_prompts(cfg),
                     kv_lr_scale=float(cfg.model.get("kv_lr_scale", 1.0)), token_lr_scale=float(cfg.model.get("token_lr_scale", 1.0)))
    method.setup(ctx)
    module = ContinualModule(pipe, prior_weight=method.prior_weight, log_every=10)
    module.begin_stage(method.begin_stage(ctx, 0, c0))
    dm = ConceptDataModule(c0, pipe.tokenizer, res, steps=args.train_steps, batch_size=int(cfg.data.batch_size), prior_images=priors,
                           prior_prompt=c0.class_prompt(), vae=pipe.vae, seed=0, cache_dir=str(cache))
    cuda = device.type == "cuda"
    starts: list[float] = []

    class WallTimer(L.Callback):  # host wall clock at every batch start (the first step: compile + capture)
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync(device)
            starts.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):
            sync(device)
            starts.append(time.perf_counter())

    events = StepTimer() if cuda else None
    trainer = instantiate(cfg.trainer, max_steps=args.train_steps, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.callbacks.extend([WallTimer()] + ([events] if events else []))
    c0s = compile_seconds()
    trainer.fit(module, datamodule=dm)
    steps_ms = events.step_ms(args.warmup) if events else [1e3 * (b - a) for a, b in zip(starts[args.warmup:], starts[args.warmup + 1:])]
    print("CHILD " + json.dumps(dict(
        variant=args.child_train, build_s=round(build_s, 2), first_step_s=round(starts[1] - starts[0], 2) if len(starts) > 1 else None,
        compile_s=round(compile_seconds() - c0s, 2), step_ms=round(statistics.median(steps_ms), 2) if steps_ms else None,
        steps=args.train_steps, process_s=round(time.perf_counter() - t_start, 1),
        inductor_cache=os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
    )), flush=True)


def part_d(args, overrides: list[str], out: Path, r: dict) -> list[dict]:
    rows = r.setdefault("d", [])
    for variant in [v for v in args.compile_variants.split(",") if v]:
        if variant not in ("full", "regional"):
            raise SystemExit(f"error: --compile-variants: {variant!r} is not full or regional")
        compile_dir = Path(tempfile.mkdtemp(prefix=f"inductor_{variant}_", dir=out))  # empty: the cold process
        for temperature in ("cold", "warm"):
            cmd = [sys.executable, __file__, *overrides, "--child-train", variant, "--cache", args.cache,
                   "--train-steps", str(args.train_steps), "--warmup", str(args.warmup)]
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(compile_dir)}
            log(f"(d) {variant} {temperature}: {' '.join(cmd[2:])}")
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD ")), None)
            if proc.returncode or line is None:
                rows.append(dict(variant=variant, cache=temperature, error=(proc.stderr or proc.stdout)[-800:]))
                log(f"(d) {variant} {temperature} failed: {rows[-1]['error']}")
                continue
            row = json.loads(line[len("CHILD "):])
            row.update(cache=temperature, wall_s=round(time.perf_counter() - t0, 1),
                       cache_mb=round(sum(f.stat().st_size for f in compile_dir.rglob("*") if f.is_file()) / 2**20, 1))
            rows.append(row)
            log(f"(d) {row}")
            (out / "bench_study.json").write_text(json.dumps(r, indent=2))
        shutil.rmtree(compile_dir, ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------------- table
def print_table(r: dict) -> None:
    print(f"\nbench_study on {r['device']} (torch {r['torch']}, diffusers {r['diffusers']}), {r['date']}; overrides: {' '.join(r['overrides']) or '-'}")
    print(f"model build: {r['build_s']} s\n")
    print("| measurement | value |\n| --- | --- |")
    a = r.get("a")
    if a:
        print(f"| (a) sampler `{a['sampler']}` ({a['precision']}), compile + first batch of {a['batch']} | {a['first_batch_s']} s (compiler {a['sampler_compile_s']} s) |")
        print(f"| (a) prior images: {a['images']} at {a['steps']} steps, batch {a['batch']} (`prior_images`, PNGs written) | {a['prior_s']} s = {a['prior_img_s']} img/s |")
        print(f"| (a) evaluation images: {a['eval_images']}, same steps, batch and sampler (`ContinualEvaluator.generate`) | {a['eval_s']} s = {a['eval_img_s']} img/s ({a['eval_over_prior']:.2f}x the prior sampler) |")
    for b in r.get("b") or []:
        print(f"| (b) evaluation after stage 1 at the run's `eval` ({b['settings']}; sampler {b['sampler']}) | {b['stage1_s']} s (stage 0: {b['base_s']} s) |")
        print(f"| (b) same after stage 7 (7 concepts learned; {b['stage7_images']} images) | {b['stage7_s']} s ({b['stage7_no_report_s']} s without report.md) |")
    c = r.get("c")
    if c:
        print(f"| (c) Table-1 protocol: {c['images']} of 2,100 images ({c['prompts']} of 42 prompts x {c['samples']} samples, {c['steps']} steps, CFG, batch {c.get('batch')}, CLIP {c['clip']}) | {c['seconds']} s = {c['img_s']} img/s |")
        print(f"| (c) whole protocol, projected from that rate | {c['projected_2100_s']} s = {c['projected_2100_s'] / 60:.1f} min |")
    for d in r.get("d", []):
        if "error" in d:
            print(f"| (d) training compile `{d['variant']}`, {d['cache']} cache | failed: {d['error'][-160:]!r} |")
            continue
        print(f"| (d) training compile `{d['variant']}`, {d['cache']} Inductor cache ({d['cache_mb']} MB after) | first step {d['first_step_s']} s "
              f"(compiler {d['compile_s']} s); median step {d['step_ms']} ms; process {d['process_s']} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--cache", default=None, help="concept images and prior images (default: <out>/cache)")
    ap.add_argument("--parts", default="a,b,c,d")
    ap.add_argument("--sampler", default=None, help="eager | compile | regional (default: compile on CUDA, eager on a CPU)")
    ap.add_argument("--images", type=int, default=50, help="(a): images of each sampler row")
    ap.add_argument("--steps", type=int, default=50, help="(a): sampling steps")
    ap.add_argument("--table1-images", type=int, default=250, help="(c): images of the protocol's 2,100 run and timed")
    ap.add_argument("--eval-batches", default=None, help="(b): comma-separated eval batch sizes (default: the config's eval.batch_size)")
    ap.add_argument("--table1-batch", type=int, default=None, help="(c): images per pipeline call (default: prior.batch_size, the compiled shape)")
    ap.add_argument("--compile-variants", default="full,regional", help="(d): full, regional")
    ap.add_argument("--train-steps", type=int, default=60, help="(d): steps per process")
    ap.add_argument("--warmup", type=int, default=20, help="(d): steps before the median")
    ap.add_argument("--child-train", default=None, help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args()
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        raise SystemExit(f"error: unknown option(s) {bad}; Hydra overrides have no leading '-', e.g. model=tiny")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.cache = str(Path(args.cache or out / "cache").resolve())
    if args.child_train:
        return child_train(args, overrides)
    use_compile_cache(args.cache)  # the sampler's compile, as in a run
    cfg = compose_cfg(overrides)
    pipe, concepts, _, device, build_s = build(cfg, Path(args.cache))
    import diffusers

    args.sampler = args.sampler or ("compile" if device.type == "cuda" else "eager")
    sampler = make_sampler(args.sampler, cfg)
    r: dict = dict(device=device_name(device), torch=torch.__version__, diffusers=diffusers.__version__, date=time.strftime("%Y-%m-%d %H:%M"),
                   overrides=overrides, argv=sys.argv[1:], build_s=round(build_s, 2))
    parts = set(args.parts.split(","))
    for name, fn in (("a", part_a), ("b", part_b), ("c", part_c)):
        if name in parts:
            log(f"({name}) ...")
            r[name] = fn(args, cfg, pipe, concepts, device, sampler, Path(args.cache) if name == "a" else out)
            log(f"({name}) {r[name]}")
            (out / "bench_study.json").write_text(json.dumps(r, indent=2))  # kept if a later part runs out of time
    if "d" in parts:
        del pipe, sampler
        if device.type == "cuda":
            torch.cuda.empty_cache()
        part_d(args, overrides, out, r)
    (out / "bench_study.json").write_text(json.dumps(r, indent=2))
    print_table(r)


if __name__ == "__main__":
    main()
