"""Pretrain the micro world's models (one GPU, about 8 minutes on an H100).

    python -m cns_lightning.microworld.pretrain --out DIR --seed 0

Stages (``--stages``, default all, in order):

1. data: ``--n-train`` scenes of the pretraining split (no held-out colour-noun pair, no personal
   concept), rendered in parallel; each keeps its full caption and one under-described variant.
2. clip: a micro ``CLIPModel`` (``arch.build_clip``) trained contrastively (AdamW, bf16 autocast).
3. vae: ``AutoencoderKL`` trained on L1 + MSE + image-gradient L1 + 1e-6 KL; the latent scaling
   factor is set to 1 / std of the latents, as SD does.
4. unet: ``UNet2DConditionModel`` trained with DDPM noise (SD-1.5's scaled-linear betas, epsilon
   prediction, min-SNR-5 weighting), 10% empty captions for classifier-free guidance, EMA 0.999,
   conditioned on the frozen CLIP text tower's last hidden states.
5. eval: zero-shot attribute accuracy of the CLIP on held-out renders; CLIP-T and attribute accuracy
   of pipeline samples (PNDM, 25 steps) on held-out compositional prompts, next to the same scores of
   the real renders of the same scenes.

Writes ``DIR/pipeline`` (``StableDiffusionPipeline.save_pretrained``), ``DIR/clip`` (CLIPModel +
CLIPProcessor), ``DIR/scores.json`` and ``DIR/samples.png``. Weights are stored in fp16 with
``dtype: float32`` in the transformers configs, so every loader builds float32 models.
``--init DIR`` starts from an existing ``DIR/clip`` / ``DIR/pipeline`` (to rerun only some stages).
Each stage stops at its step count or at its ``--*-max-seconds`` cap (logged in scores.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import save_json
from .trainstate import load_training_state, save_training_state
from . import arch
from . import world as W
from .metrics import attribute_accuracy, clip_t, pixel_values

OMIT_VARIANTS = ({"colour", "pattern"}, {"colour", "pattern"}, {"pattern"}, {"position"}, {"size"}, {"colour"})


# --------------------------------------------------------------------------------------------- data


def _token_ids(tok, captions: list[str]) -> np.ndarray:
    """int32 [n, 77]: captions padded to CLIP's 77 positions."""
    return np.asarray(tok(captions, padding="max_length", max_length=77, truncation=True).input_ids, np.int32)


def _render_chunk(args):
    scenes, omits = args
    from ..tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    imgs = np.stack([np.asarray(s.render()) for s in scenes])
    full = [s.caption() for s in scenes]
    part = [s.caption(o) for s, o in zip(scenes, omits)]
    return imgs, _token_ids(tok, full), _token_ids(tok, part)


def identity_caption(scene: W.Scene, omit: frozenset[str] | set[str] = frozenset()) -> str:
    """The caption of a scene showing random identities (``identity.view_scene``), in the world's
    words only: a random glyph is named by its noun alone (as an under-described world object), a
    random background or style has no clause (the world has no word for it)."""
    text = " and ".join(
        (replace(o, glyph=None).phrase(set(omit) | {"colour", "pattern"}) if o.glyph is not None else o.phrase(omit)) for o in scene.objects
    )
    if scene.background in W.BACKGROUNDS:
        text += f", on a {scene.background} background"
    if scene.style in W.STYLES and scene.style != "none":
        text += f", in {scene.style} style"
    return text


def _render_identity_chunk(args):
    """Like ``_render_chunk`` for scenes of random identities (never the personal concepts)."""
    from ..tokenizer import clip_tokenizer
    from . import identity as I

    seed, n, omits = args
    rng = np.random.default_rng(seed)
    idents = [i for i in I.sample_identities(rng, 2 * n) if i.kind != "plain"][:n]  # plain objects are world objects
    while len(idents) < n:
        idents.append(I.random_glyph(rng))
    tok = clip_tokenizer()
    imgs, full, part = [], [], []
    for ident, o in zip(idents, omits):
        scene, needs = I.view_scene(ident, rng)
        imgs.append(np.asarray(I.render(scene, needs)))
        full.append(identity_caption(scene))
        part.append(identity_caption(scene, o))
    return np.stack(imgs), _token_ids(tok, full), _token_ids(tok, part)


def make_data(n: int, seed: int, workers: int, identity_share: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 64, 64, 3], token ids int32 [n, 2, 77]: full caption, under-described one).

    ``identity_share`` of the scenes show random identities of ``identity.py`` instead of world
    objects (multi-colour glyphs named by their noun only, backgrounds and styles the world has no
    word for), so the VAE and the UNet have seen things the world's words cannot describe, as
    SD-1.5 has seen countless dogs that no caption describes exactly."""
    rng = np.random.default_rng(seed)
    n_id = int(round(n * identity_share))
    scenes = [W.sample_scene(rng, "train") for _ in range(n - n_id)]
    omits = [OMIT_VARIANTS[rng.integers(len(OMIT_VARIANTS))] for _ in range(n)]
    k = 2000
    chunks = [(scenes[i : i + k], omits[i : i + k]) for i in range(0, len(scenes), k)]
    id_chunks = [(seed * 1_000_003 + i, min(k, n_id - i), omits[len(scenes) + i : len(scenes) + i + k]) for i in range(0, n_id, k)]
    with mp.get_context("fork").Pool(workers) as pool:
        parts = pool.map(_render_chunk, chunks) + pool.map(_render_identity_chunk, id_chunks)
    imgs = np.concatenate([p[0] for p in parts])
    ids = np.stack([np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])], 1)
    return imgs, ids


# --------------------------------------------------------------------------------------------- stages


def _autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available())


def _lr(step: int, total: int, peak: float, warm: int = 200) -> float:
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def _to_img(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 64, 64, 3] -> float [B, 3, 64, 64] in [-1, 1]."""
    return x_u8.permute(0, 3, 1, 2).float() / 127.5 - 1


def train_clip(clip, imgs, ids, steps, batch, lr, max_s, gen, log):
    dev = imgs.device
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    clip.train()
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        idx = torch.randint(0, len(imgs), (batch,), device=dev, generator=gen)
        variant = (torch.rand(batch, device=dev, generator=gen) < 0.2).long()
        tok = ids[idx, variant].long()
        pv = pixel_values(imgs[idx].permute(0, 3, 1, 2).float() / 255.0)
        with _autocast():
            out = clip(input_ids=tok, pixel_values=pv, return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        if step % 500 == 0 or step == steps - 1:
            log(f"clip step {step} loss {out.loss.item():.4f} {time.time() - t0:.0f}s")
        if time.time() - t0 > max_s:
            log(f"clip stopped by time cap at step {step + 1}")
            return step + 1
    return steps


def train_vae(vae, imgs, steps, batch, lr, max_s, gen, log):
    dev = imgs.device
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        x = _to_img(imgs[torch.randint(0, len(imgs), (batch,), device=dev, generator=gen)])
        with _autocast():
            post = vae.encode(x).latent_dist
            z = post.sample()
            rec = vae.decode(z).sample.float()
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        grad = (torch.diff(rec, dim=-1) - torch.diff(x, dim=-1)).abs().mean() + (torch.diff(rec, dim=-2) - torch.diff(x, dim=-2)).abs().mean()
        kl = post.kl().mean() / z[0].numel()
        loss = l1 + mse + 0.5 * grad + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"vae step {step} l1 {l1.item():.4f} mse {mse.item():.5f} kl/elem {kl.item():.3f} {time.time() - t0:.0f}s")
        if time.time() - t0 > max_s:
            log(f"vae stopped by time cap at step {step + 1}")
            return step + 1
    return steps


@torch.no_grad()
def encode_all(vae, imgs, batch=1024):
    vae.eval()
    mus, stds = [], []
    for i in range(0, len(imgs), batch):
        with _autocast():
            d = vae.encode(_to_img(imgs[i : i + batch])).latent_dist
        mus.append(d.mean.half())
        stds.append(d.std.half())
    return torch.cat(mus), torch.cat(stds)


def train_unet(unet, text_encoder, mus, stds, ids, empty_ids, scale, steps, batch, lr, max_s, gen, log, ckpt: Path | None = None, ckpt_every: int = 1000):
    """DDPM epsilon training with min-SNR-5 weighting and an EMA; returns (EMA UNet, steps done).

    With ``ckpt``, the UNet, its EMA, the optimizer, the step and the generator state are saved
    every ``ckpt_every`` steps and when the time cap stops the stage; a call that finds the file
    continues from it (same schedule, same data order), so a stopped pretraining loses at most
    ``ckpt_every`` steps.
    """
    from diffusers import DDPMScheduler

    dev = mus.device
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    ac = sched.alphas_cumprod.to(dev)
    snr = ac / (1 - ac)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_params, unet_params = list(ema.parameters()), list(unet.parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    start = 0
    if ckpt is not None and ckpt.is_file():
        st = load_training_state(ckpt, map_location=dev)
        if st["steps"] != steps or st["batch"] != batch:
            raise SystemExit(f"{ckpt} was made with --unet-steps {st['steps']} --unet-batch {st['batch']}; pass the same values or delete it")
        unet.load_state_dict(st["unet"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"].cpu())
        start = st["step"]
        log(f"unet resumed from {ckpt} at step {start}")

    def checkpoint(step: int) -> None:
        if ckpt is not None:
            save_training_state(ckpt, dict(unet=unet.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), gen=gen.get_state(), step=step, steps=steps, batch=batch))

    unet.train()
    text_encoder.eval().requires_grad_(False)
    t0 = time.time()
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warm=500)
        idx = torch.randint(0, len(mus), (batch,), device=dev, generator=gen)
        z0 = (mus[idx].float() + stds[idx].float() * torch.randn(mus[idx].shape, device=dev, generator=gen)) * scale
        r = torch.rand(batch, device=dev, generator=gen)
        tok = torch.where((r < 0.25)[:, None], ids[idx, 1], ids[idx, 0]).long()
        tok = torch.where((r > 0.9)[:, None], empty_ids.expand(batch, -1), tok)
        t = torch.randint(0, 1000, (batch,), device=dev, generator=gen)
        noise = torch.randn(z0.shape, device=dev, generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with _autocast():
            with torch.no_grad():
                h = text_encoder(tok).last_hidden_state
            pred = unet(zt, t, h).sample.float()
        w = torch.clamp(snr[t], max=5.0) / snr[t]
        loss = (w * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(0.999, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, unet_params, 1 - d)
        if step % 500 == 0 or step == steps - 1:
            log(f"unet step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s")
        if (step + 1) % ckpt_every == 0:
            checkpoint(step + 1)
        if time.time() - t0 > max_s:
            log(f"unet stopped by time cap at step {step + 1}")
            checkpoint(step + 1)
            return ema, step + 1
    checkpoint(steps)
    return ema, steps


# --------------------------------------------------------------------------------------------- saving


def _patch_dtype(config_json: Path) -> None:
    """fp16 weights on disk, float32 models on load (transformers 5 otherwise keeps fp16)."""
    cfg = json.loads(config_json.read_text())
    cfg["dtype"] = "float32"
    cfg.pop("torch_dtype", None)
    for k in ("text_config", "vision_config"):
        if isinstance(cfg.get(k), dict):
            cfg[k]["dtype"] = "float32"
            cfg[k].pop("torch_dtype", None)
    config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def processor():
    from transformers import CLIPImageProcessor, CLIPProcessor

    from ..tokenizer import clip_tokenizer
    from .metrics import CLIP_MEAN, CLIP_STD

    ip = CLIPImageProcessor(
        size={"shortest_edge": W.RES}, crop_size={"height": W.RES, "width": W.RES}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
    )
    return CLIPProcessor(image_processor=ip, tokenizer=clip_tokenizer())


def save_clip(clip, folder: Path) -> None:
    c = copy.deepcopy(clip).cpu().half()
    c.save_pretrained(folder, max_shard_size="15MB")  # the package ships no file over 16 MB
    processor().save_pretrained(folder)
    _patch_dtype(folder / "config.json")


def build_pipeline(clip, vae, unet):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from ..models import _scheduler
    from ..tokenizer import clip_tokenizer

    te = CLIPTextModel(clip.config.text_config)
    # transformers 5: CLIPModel.text_model is a CLIPTextModel; 4.x: both hold a CLIPTextTransformer
    (te.text_model if hasattr(te, "text_model") else te).load_state_dict(clip.text_model.state_dict())
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=clip_tokenizer(), unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, folder: Path) -> None:
    p = copy.deepcopy(pipe).to("cpu")
    for m in (p.unet, p.vae, p.text_encoder):
        m.to(torch.float16)
    p.save_pretrained(folder, safe_serialization=True, max_shard_size="15MB")
    _patch_dtype(folder / "text_encoder" / "config.json")


# --------------------------------------------------------------------------------------------- eval


@torch.no_grad()
def sample(pipe, prompts, guidance, seed, steps=25, batch=None):
    batch = batch or (256 if pipe.device.type == "cuda" else 8)
    out = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator(pipe.device).manual_seed(seed + i)
        r = pipe(list(prompts[i : i + batch]), num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="np", height=W.RES, width=W.RES)
        out.append((r.images * 255).round().astype(np.uint8))
    return np.concatenate(out)


def evaluate(clip, tok, pipe, n_eval, seed, out_dir: Path, log, guidances=(3.0, 5.0)) -> dict:
    from PIL import Image

    clip.eval()
    scores: dict = {}
    held = W.heldout_scenes(n_eval, seed=10_000 + seed)
    real = np.stack([np.asarray(s.render()) for s in held])
    rng = np.random.default_rng(20_000 + seed)
    seen = [W.sample_scene(rng, "train", two_objects=0.0) for _ in range(n_eval)]
    real_seen = np.stack([np.asarray(s.render()) for s in seen])
    caps = [s.caption() for s in held]
    scores["clip_attribute_accuracy_heldout_real"] = attribute_accuracy(clip, tok, real, held)
    scores["clip_attribute_accuracy_seen_real"] = attribute_accuracy(clip, tok, real_seen, seen)
    scores["chance"] = {a: 1 / len(W.attribute_values(a)) for a in W.ATTRIBUTES}
    scores["clip_t_heldout_real"] = clip_t(clip, tok, real, caps)
    # a mismatched baseline: each real image against another scene's caption
    scores["clip_t_heldout_real_shuffled"] = clip_t(clip, tok, real, caps[1:] + caps[:1])
    log(json.dumps(scores))
    if pipe is not None:
        for gs in guidances:
            gen = sample(pipe, caps, gs, seed)
            key = f"gs{gs:g}"
            scores[f"pipeline_clip_t_heldout_{key}"] = clip_t(clip, tok, gen, caps)
            scores[f"pipeline_attribute_accuracy_heldout_{key}"] = attribute_accuracy(clip, tok, gen, held)
            log(f"{key}: clip_t {scores[f'pipeline_clip_t_heldout_{key}']:.4f} attr {scores[f'pipeline_attribute_accuracy_heldout_{key}']}")
            if gs == guidances[0]:
                grid = np.concatenate([np.concatenate(list(real[:16]), 1), np.concatenate(list(gen[:16]), 1)], 0)
                Image.fromarray(grid).save(out_dir / "samples.png")
                (out_dir / "samples.txt").write_text("\n".join(caps[:16]) + "\n")
        g0 = guidances[0]
        gen = sample(pipe, [s.caption() for s in seen], g0, seed)
        scores[f"pipeline_clip_t_seen_gs{g0:g}"] = clip_t(clip, tok, gen, [s.caption() for s in seen])
        scores[f"pipeline_attribute_accuracy_seen_gs{g0:g}"] = attribute_accuracy(clip, tok, gen, seen)
        scores["clip_t_seen_real"] = clip_t(clip, tok, real_seen, [s.caption() for s in seen])
    return scores


# --------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default="clip,vae,unet,eval")
    ap.add_argument("--init", type=Path, default=None, help="folder with clip/ and pipeline/ to start from")
    ap.add_argument("--init-parts", default="clip,vae,unet", help="which parts --init gives (the rest are built new)")
    ap.add_argument("--text-width", type=int, default=arch.TEXT["hidden_size"], help="text tower width of a new CLIP (and the UNet's cross-attention width)")
    ap.add_argument("--unet-attention", choices=sorted(arch.UNET_LAYOUTS), default="low", help="cross-attention levels of a new UNet (arch.UNET_LAYOUTS)")
    ap.add_argument("--ckpt-every", type=int, default=1000, help="UNet checkpoint every N steps (OUT/checkpoint_unet.pt; a rerun resumes)")
    ap.add_argument("--n-train", type=int, default=150_000)
    ap.add_argument("--identity-share", type=float, default=0.0, help="share of pretraining scenes showing random identities (make_data)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--clip-steps", type=int, default=6000)
    ap.add_argument("--clip-batch", type=int, default=512)
    ap.add_argument("--clip-lr", type=float, default=1e-3)
    ap.add_argument("--clip-max-seconds", type=float, default=130)
    ap.add_argument("--vae-steps", type=int, default=4000)
    ap.add_argument("--vae-batch", type=int, default=128)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--vae-max-seconds", type=float, default=80)
    ap.add_argument("--unet-steps", type=int, default=10000)
    ap.add_argument("--unet-batch", type=int, default=256)
    ap.add_argument("--unet-lr", type=float, default=4e-4)
    ap.add_argument("--unet-max-seconds", type=float, default=200)
    ap.add_argument("--n-eval", type=int, default=300)
    ap.add_argument("--guidances", default="3,5", help="classifier-free guidance scales to score")
    ap.add_argument("--evaluator", type=Path, default=None, help="CLIP folder that scores the eval stage (default: the CLIP trained or loaded here); e.g. the shipped clip/ to score a new text width on the shipped scale")
    a = ap.parse_args(argv)
    if not 0.0 <= a.identity_share <= 1.0:
        ap.error(f"--identity-share {a.identity_share}: a share of the pretraining scenes, from 0 (world scenes only) to 1; e.g. --identity-share 0.3")

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel

    from ..tokenizer import clip_tokenizer

    stages = set(a.stages.split(","))
    a.out.mkdir(parents=True, exist_ok=True)
    logf = open(a.out / "log.txt", "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    t0 = time.time()
    training = bool(stages & {"clip", "vae", "unet"})
    if training:
        imgs_np, ids_np = make_data(a.n_train, a.seed, a.workers, a.identity_share)  # before CUDA starts (forked workers)
        log(f"data: {len(imgs_np)} scenes in {time.time() - t0:.0f}s")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(a.seed)
    gen = torch.Generator(dev).manual_seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    info = {"args": {k: str(v) for k, v in vars(a).items()}, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
    if training:
        imgs, ids = torch.from_numpy(imgs_np).to(dev), torch.from_numpy(ids_np).to(dev)
    tok = clip_tokenizer()

    parts = set(a.init_parts.split(",")) if a.init is not None else set()
    clip = CLIPModel.from_pretrained(a.init / "clip") if "clip" in parts else arch.build_clip(**arch.text_width(a.text_width))
    vae = AutoencoderKL.from_pretrained(a.init / "pipeline" / "vae") if "vae" in parts else arch.build_vae()
    unet = arch.build_unet(a.unet_attention, cross_attention_dim=clip.config.text_config.hidden_size)
    if "unet" in parts:  # an earlier UNet: same architecture, or one level of attention fewer (warm start)
        earlier = UNet2DConditionModel.from_pretrained(a.init / "pipeline" / "unet")
        new_blocks = arch.warm_start(unet, earlier.state_dict())
        if new_blocks:
            log(f"unet warm start from {a.init}: new attention blocks {new_blocks} start as identities")
        if earlier.config.cross_attention_dim != unet.config.cross_attention_dim:
            log(f"unet warm start from {a.init}: text width {earlier.config.cross_attention_dim} -> {unet.config.cross_attention_dim}, cross-attention K/V new (to_v zero), every other weight copied")
    clip, vae, unet = clip.to(dev), vae.to(dev), unet.to(dev)

    # A rerun with the same --out resumes: finished stages are loaded, the UNet from its checkpoint.
    progress_file = a.out / "progress.json"
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else {}

    def finished(stage: str, steps: int) -> None:
        progress[stage] = steps
        save_json(progress_file, progress)  # atomically: a crash leaves the last complete record

    if "clip" in stages and "clip" in progress:
        clip = CLIPModel.from_pretrained(a.out / "clip").to(dev)
        log(f"clip: finished earlier ({progress['clip']} steps), loaded from {a.out / 'clip'}")
    elif "clip" in stages:
        t = time.time()
        info["clip_steps"] = train_clip(clip, imgs, ids, a.clip_steps, a.clip_batch, a.clip_lr, a.clip_max_seconds, gen, log)
        info["clip_seconds"] = time.time() - t
        save_clip(clip, a.out / "clip")
        finished("clip", info["clip_steps"])
    clip.eval().requires_grad_(False)
    if "vae" in stages and "vae" in progress:
        vae = AutoencoderKL.from_pretrained(a.out / "vae").to(dev)
        log(f"vae: finished earlier ({progress['vae']} steps), loaded from {a.out / 'vae'}")
    elif "vae" in stages:
        t = time.time()
        info["vae_steps"] = train_vae(vae, imgs, a.vae_steps, a.vae_batch, a.vae_lr, a.vae_max_seconds, gen, log)
        info["vae_seconds"] = time.time() - t
        vae.save_pretrained(a.out / "vae")
        finished("vae", info["vae_steps"])
    vae.eval().requires_grad_(False)
    if "unet" in stages:
        mus, stds = encode_all(vae, imgs)
        z = (mus[:20000].float() + stds[:20000].float() * torch.randn_like(mus[:20000].float()))
        scale = float(1.0 / z.std())
        vae.register_to_config(scaling_factor=scale)
        log(f"latent scaling factor {scale:.4f}")
        empty = torch.tensor(tok("", padding="max_length", max_length=77).input_ids, device=dev)[None]
        t = time.time()
        unet, info["unet_steps"] = train_unet(
            unet, clip.text_model, mus, stds, ids, empty, scale, a.unet_steps, a.unet_batch, a.unet_lr, a.unet_max_seconds, gen, log,
            ckpt=a.out / "checkpoint_unet.pt", ckpt_every=a.ckpt_every,
        )
        info["unet_seconds"] = time.time() - t
        del mus, stds
    pipe = build_pipeline(clip, vae, unet).to(dev)
    if training:
        save_pipeline(pipe, a.out / "pipeline")
    if "eval" in stages:
        gs = tuple(float(g) for g in a.guidances.split(","))
        scorer = CLIPModel.from_pretrained(a.evaluator).to(dev) if a.evaluator is not None else clip
        info["scores"] = evaluate(scorer, tok, pipe, a.n_eval, a.seed, a.out, log, guidances=gs)
    info["total_seconds"] = time.time() - t0
    (a.out / "scores.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"done in {info['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
