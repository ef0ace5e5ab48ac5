"""What limits personalization in the micro world: one concept, several trainable sets and recipes.

For each concept this trains, from the base micro pipeline each time, a list of *recipes*: which
tensors train (the token only, CNS's concept neurons of K/V, every K/V entry, or the whole UNet as
DreamBooth does) with which learning rates, steps, batch and prior weight. It then samples the
concept's evaluation prompts and scores the samples against the concept's reference images with the
identity embedding (``--identity``, the micro DINO) and the micro CLIP (CLIP-I), beside the base
model's samples for the class prompts. A concept counts as *learned* by a recipe when its identity
score closes at least half of the gap between the base model's class samples and the references'
own similarity (issue 14's rule, ``learned``).

It is a diagnostic, not the framework's training loop: it runs any trainable set on one concept in
a few seconds on a GPU, with no run folder. The framework's methods are measured with the real CLI.

    python experiments/micro_probe.py --concepts cup_heart --out probe/ --identity src/cns_lightning/assets/micro/identity
    python experiments/micro_probe.py --summarize probe/          # the table over every concept run
    --recipe 'kv_long:set=kv,lr=3e-3,steps=1000' adds a recipe; --recipes picks among the named ones.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image, ImageDraw

from cns_lightning.evaluation.metrics import clip_image_similarity, learned, load_clip, load_dino, self_similarity
from cns_lightning.microworld import concepts as MC
from cns_lightning.microworld.assets import clip_path, micro_pipeline
from cns_lightning.models import cross_attention_kv
from cns_lightning.selection import SelectionConfig, encode_norms, select_concept_neurons

TOKEN = "<new1>"


@dataclass(frozen=True)
class Recipe:
    name: str
    set: str = "kv"  # token | cns | kv | unet
    lr: float = 3e-3  # K/V entries (cns, kv) or every UNet weight (unet)
    lr_token: float = 5e-4
    steps: int = 500
    batch: int = 2  # concept images per step (plus as many prior images)
    prior_weight: float = 1.0
    ratio: float = 0.1  # CNS's kept share (row_topk)


RECIPES = {
    r.name: r
    for r in (
        Recipe("token", set="token", lr_token=5e-3),
        Recipe("cns", set="cns"),
        Recipe("cns_x3", set="cns", lr=1e-2),
        Recipe("cns_r30", set="cns", ratio=0.3),
        Recipe("kv", set="kv"),
        Recipe("kv_1000", set="kv", steps=1000),
        Recipe("unet", set="unet", lr=2e-5),  # 1e-4 wrecks the micro UNet within 5 steps
        Recipe("unet_1000", set="unet", lr=2e-5, steps=1000),
    )
}


def parse_recipe(text: str) -> Recipe:
    """``'name:set=kv,lr=3e-3,steps=1000'`` -> Recipe (fields not given keep their defaults)."""
    name, _, rest = text.partition(":")
    kw = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        field = Recipe.__dataclass_fields__.get(k)
        if field is None:
            raise SystemExit(f"--recipe {text!r}: unknown field {k!r}; fields: {list(Recipe.__dataclass_fields__)}")
        kw[k] = v if field.type == "str" else (int(v) if field.type == "int" else float(v))
    return replace(RECIPES.get(name, Recipe(name)), name=name, **kw)


# ----------------------------------------------------------------------------------------- model


def fresh_pipeline(model: str | None, device: torch.device, class_name: str):
    """The base micro pipeline with the concept token added, initialised from the class noun."""
    pipe = micro_pipeline(model)
    pipe.tokenizer.add_tokens([TOKEN])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    emb = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        init = pipe.tokenizer(class_name, add_special_tokens=False).input_ids
        emb[-1] = emb[init].mean(0)
    return pipe.to(device)


def encode_text(pipe, prompts: list[str]) -> torch.Tensor:
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.device))[0]


@torch.no_grad()
def latent_stats(pipe, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std of each image and its mirror image (2n x 4 x h x w)."""
    x = torch.from_numpy(np.stack([np.asarray(i, np.float32) for i in images])).permute(0, 3, 1, 2) / 127.5 - 1
    x = torch.cat([x, x.flip(-1)]).to(pipe.device)
    post = pipe.vae.encode(x).latent_dist
    s = pipe.vae.config.scaling_factor
    return post.mean * s, post.std * s


def trainable(pipe, recipe: Recipe, captions: list[str]) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Optimizer groups and gradient masks for the recipe's trainable set (the token row always trains)."""
    unet = pipe.unet
    unet.requires_grad_(recipe.set == "unet")
    pipe.text_encoder.requires_grad_(False)
    emb = pipe.text_encoder.get_input_embeddings().weight
    emb.requires_grad_(True)
    row = torch.zeros_like(emb, dtype=torch.bool)
    row[-1] = True
    masks = {"token": row}
    groups = [dict(params=[emb], lr=recipe.lr_token)]
    kv = cross_attention_kv(unet)
    if recipe.set == "unet":
        groups.append(dict(params=[p for p in unet.parameters()], lr=recipe.lr))
    elif recipe.set in ("kv", "cns"):
        for p in kv.values():
            p.requires_grad_(True)
        groups.append(dict(params=list(kv.values()), lr=recipe.lr))
        if recipe.set == "cns":
            with torch.no_grad():
                cfg = SelectionConfig(ratio=recipe.ratio)
                norms = encode_norms(pipe.text_encoder, pipe.tokenizer, captions, cfg.tokens)
                calib = encode_norms(pipe.text_encoder, pipe.tokenizer, MC.calibration_prompts(20), cfg.tokens)
                sel, _ = select_concept_neurons({n: p.detach() for n, p in kv.items()}, norms, calib, cfg)
            masks.update(sel)
    params = {id(p): n for n, p in kv.items()}
    params[id(emb)] = "token"
    return groups, {id_: masks[n] for id_, n in params.items() if n in masks}


def train(pipe, recipe: Recipe, captions: list[str], refs: list[Image.Image], priors: list[Image.Image], prior_prompts: list[str], seed: int) -> float:
    """Diffusion loss on the concept (+ prior_weight x the class prior loss, Eq. 8); returns seconds."""
    t0 = time.time()
    groups, grad_masks = trainable(pipe, recipe, captions)
    opt = torch.optim.Adam(groups, betas=(0.9, 0.999), eps=1e-8)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(seed)
    cm, cs = latent_stats(pipe, refs)
    pm, ps = latent_stats(pipe, priors)
    caps = captions + captions  # mirrors share the caption
    pcaps = prior_prompts + prior_prompts
    pipe.unet.train()
    for _ in range(recipe.steps):
        i = torch.randint(len(cm), (recipe.batch,), generator=g)
        j = torch.randint(len(pm), (recipe.batch,), generator=g)
        mean, std = torch.cat([cm[i], pm[j]]), torch.cat([cs[i], ps[j]])
        eps0 = torch.randn(mean.shape, generator=g).to(mean.device)
        lat = mean + std * torch.randn(mean.shape, generator=g).to(mean.device)
        t = torch.randint(sched.config.num_train_timesteps, (len(lat),), generator=g).to(mean.device)
        cond = encode_text(pipe, [caps[k] for k in i.tolist()] + [pcaps[k] for k in j.tolist()])
        pred = pipe.unet(sched.add_noise(lat, eps0, t), t, cond).sample
        b = recipe.batch
        loss = F.mse_loss(pred[:b], eps0[:b]) + recipe.prior_weight * F.mse_loss(pred[b:], eps0[b:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for grp in opt.param_groups:
            for p in grp["params"]:
                m = grad_masks.get(id(p))
                if m is not None and p.grad is not None:
                    p.grad.mul_(m)
        opt.step()
    pipe.unet.eval()
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    return time.time() - t0


@torch.no_grad()
def sample(pipe, prompts: list[str], n: int, seed: int, guidance: float, steps: int) -> list[Image.Image]:
    gens = [torch.Generator().manual_seed(seed + 1000 * j + k) for j in range(len(prompts)) for k in range(n)]
    lat = torch.stack([torch.randn((4, 16, 16), generator=x) for x in gens]).to(pipe.device)
    ps = [p for p in prompts for _ in range(n)]
    return pipe(ps, latents=lat, num_inference_steps=steps, guidance_scale=guidance).images


# ----------------------------------------------------------------------------------------- scoring


class Scorers:
    def __init__(self, identity: str | None, device):
        self.clip = load_clip(clip_path(), device)
        self.identity = load_dino(identity, device) if identity else None

    def embed(self, images) -> dict[str, torch.Tensor]:
        out = {"clip_i": self.clip.image_embeddings(images)}
        if self.identity is not None:
            out["identity"] = self.identity.image_embeddings(images)
        return out


def similarity(gen: dict, ref: dict) -> dict[str, float]:
    """CLIP-I (x 100) of generated images to the references, per embedding."""
    return {k: clip_image_similarity(gen[k], ref[k]) for k in gen}


def self_similarities(ref: dict) -> dict[str, float]:
    return {k: self_similarity(e) for k, e in ref.items()}


def grid(rows: list[tuple[str, list[Image.Image]]], path: Path, cols: int = 8, size: int = 64) -> None:
    """One labelled row of images per entry (references, base samples, each recipe's samples)."""
    label = 96
    img = Image.new("RGB", (label + cols * size, len(rows) * size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for r, (name, ims) in enumerate(rows):
        d.text((3, r * size + size // 2 - 6), name[:15], fill=(0, 0, 0))
        for c, im in enumerate(ims[:cols]):
            img.paste(im.resize((size, size)), (label + c * size, r * size))
    img.save(path)


def probe(concept: str, recipes: list[Recipe], args, device) -> dict:
    c = MC.CONCEPTS[concept]
    scenes = c.scenes()
    refs = [MC.render(s) for s in scenes]
    captions = [s.caption().replace("{token}", TOKEN) for s in scenes]
    fill = lambda p, tok: p.format(token=tok, **{"class": c.class_name}).replace("  ", " ")
    prompts = [fill(p, TOKEN) for p in c.eval_prompts[: args.prompts]]
    class_prompts = [fill(p, "").strip().replace("  ", " ") for p in c.eval_prompts[: args.prompts]]
    scorers = Scorers(args.identity, device)
    ref_emb = scorers.embed(refs)
    base_pipe = fresh_pipeline(args.model, device, c.class_name)
    prior_prompts = [MC.class_prompt(s.caption()) for s in scenes]
    priors = sample(base_pipe, prior_prompts, args.priors_per_caption, 7, args.guidance, args.sampler_steps)
    prior_prompts = [p for p in prior_prompts for _ in range(args.priors_per_caption)]
    base_imgs = sample(base_pipe, class_prompts, args.samples, args.seed, args.guidance, args.sampler_steps)
    result = dict(
        concept=concept, category=c.category, reference=self_similarities(ref_emb), base=similarity(scorers.embed(base_imgs), ref_emb), recipes={}
    )
    rows = [("references", refs), ("base (class)", base_imgs[:: max(1, args.samples // 2)])]
    del base_pipe
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"references": _stack(refs), "base": _stack(base_imgs)}
    for r in recipes:
        pipe = fresh_pipeline(args.model, device, c.class_name)
        secs = train(pipe, r, captions, refs, priors, prior_prompts, args.seed)
        imgs = sample(pipe, prompts, args.samples, args.seed, args.guidance, args.sampler_steps)
        score = similarity(scorers.embed(imgs), ref_emb)
        verdict = {k: learned(score[k], result["base"][k], result["reference"][k]) for k in score}
        result["recipes"][r.name] = dict(recipe=asdict(r), seconds=round(secs, 1), score=score, learned=verdict)
        rows.append((r.name, imgs[:: max(1, args.samples // 2)]))
        print(f"[probe] {concept} {r.name}: {json.dumps(score)} learned={verdict} ({secs:.1f} s)", flush=True)
        arrays[r.name] = _stack(imgs)
        grid(rows, out / f"{concept}.png")  # after every recipe: a time cap keeps what was done
        (out / f"{concept}.json").write_text(json.dumps(result, indent=1))
        np.savez_compressed(out / f"{concept}.npz", **arrays)  # every sample, to rescore with another embedding
    return result


def _stack(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(i.convert("RGB")) for i in images])


def rescore(folder: Path, identity: str, device) -> None:
    """Score a finished probe folder's saved samples again with another identity embedding."""
    scorers = Scorers(identity, device)
    for f in sorted(folder.glob("*.json")):
        r = json.loads(f.read_text())
        arrays = np.load(f.with_suffix(".npz"))
        emb = lambda k: scorers.embed([Image.fromarray(a) for a in arrays[k]])
        ref = emb("references")
        r["reference"], r["base"] = self_similarities(ref), similarity(emb("base"), ref)
        for name, x in r["recipes"].items():
            x["score"] = similarity(emb(name), ref)
            x["learned"] = {k: learned(x["score"][k], r["base"][k], r["reference"][k]) for k in x["score"]}
        r["identity_model"] = identity
        f.write_text(json.dumps(r, indent=1))


def summarize(folder: Path) -> str:
    """A markdown table per concept: identity / CLIP-I of base, references and every recipe."""
    lines = []
    counts: dict[str, list[int]] = {}
    for f in sorted(folder.glob("*.json")):
        r = json.loads(f.read_text())
        key = "identity" if "identity" in r["base"] else "clip_i"
        lines += [f"### {r['concept']} ({r['category']})", "", f"| recipe | {key} | CLIP-I | learned | s |", "| --- | --- | --- | --- | --- |"]
        lines.append(f"| references (self) | {r['reference'][key]:.1f} | {r['reference']['clip_i']:.1f} | | |")
        lines.append(f"| base, class prompt | {r['base'][key]:.1f} | {r['base']['clip_i']:.1f} | | |")
        for name, x in r["recipes"].items():
            ok = x["learned"][key]
            counts.setdefault(name, [0, 0])
            counts[name][0] += int(ok)
            counts[name][1] += 1
            lines.append(f"| {name} | {x['score'][key]:.1f} | {x['score']['clip_i']:.1f} | {'yes' if ok else 'no'} | {x['seconds']} |")
        lines.append("")
    lines += ["| recipe | learned |", "| --- | --- |"] + [f"| {k} | {a} / {b} |" for k, (a, b) in counts.items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", default="cup_heart", help="comma-separated micro concept names")
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"named recipes: {list(RECIPES)}")
    ap.add_argument("--recipe", action="append", default=[], help="extra recipe 'name:field=value,...'")
    ap.add_argument("--model", default=None, help="micro pipeline folder (default: the shipped one)")
    ap.add_argument("--identity", default=None, help="identity embedding folder (micro DINO)")
    ap.add_argument("--out", default="probe_out")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt")
    ap.add_argument("--priors-per-caption", type=int, default=4)
    ap.add_argument("--sampler-steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--summarize", default=None, help="print the table of a finished --out folder")
    ap.add_argument("--rescore", default=None, help="score a finished --out folder's samples again with --identity")
    args = ap.parse_args()
    if args.rescore:
        rescore(Path(args.rescore), args.identity, torch.device(args.device))
        args.summarize = args.rescore
    if args.summarize:
        print(summarize(Path(args.summarize)))
        return
    names = [n for n in args.concepts.split(",") if n]
    unknown = [n for n in names if n not in MC.CONCEPTS]
    if unknown:
        raise SystemExit(f"--concepts: unknown {unknown}; choose from {list(MC.CONCEPTS)}")
    named = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in named if n not in RECIPES]
    if unknown:
        raise SystemExit(f"--recipes: unknown {unknown}; choose from {list(RECIPES)}")
    recipes = [RECIPES[n] for n in named]
    recipes += [parse_recipe(t) for t in args.recipe]
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    for n in names:
        probe(n, recipes, args, device)


if __name__ == "__main__":
    main()
