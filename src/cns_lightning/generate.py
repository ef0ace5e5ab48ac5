"""Images from one run with any subset of its learned concepts in one prompt.

``python -m cns_lightning.generate RUN_DIR --prompt "a <new1> dog next to a <new2> cat" [--prompt ...]
[--n 4] [--seed 0] [--steps 25] [--guidance G] [--stage N] [--out DIR]``

No fusion step: the model after stage N (``restore.load_run``) holds concepts 1..N at once. Image
``i`` of every prompt uses seed ``seed + i``, so an image can be reproduced alone. Writes
``pNN_iMM.png`` per image and ``prompts.json`` (prompts, files, settings) into the output folder,
which is written beside and renamed at the end (nothing half-written). Every check (run folder,
stage, tokens in the prompts, output folder) runs before the model is built.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError, atomic_folder
from .concepts import ConceptError
from .restore import RestoreError, RunInfo, check_stage, load_run, read_run

# A token-like word in a prompt: <anything without spaces or brackets>.
TOKEN_RE = re.compile(r"<[^<>\s]+>")


def mentions(prompt: str, token: str) -> bool:
    """Does ``prompt`` hold ``token`` as a word of its own (not inside a longer word or token)?"""
    return re.search(rf"(?<![\w<]){re.escape(token)}(?![\w>])", prompt) is not None


class GenerateError(ValueError):
    """Images cannot be generated as asked; the message names the problem and the fix."""


def check_prompt_tokens(prompts: list[str], info: RunInfo, stage: int) -> None:
    """Every token in the prompts must be one the run learned by ``stage``; else name it and list the learned ones."""
    learned = info.learned(stage)
    known = {c.token for c in learned}
    later = {c.token: i + 1 for i, c in enumerate(info.concepts) if i >= stage}
    span = "stage 1" if stage == 1 else f"stages 1-{stage}"
    listing = ", ".join(f"{c.token} ({c.name}, a {c.class_name})" for c in learned)
    for p in prompts:
        if not p.strip():
            raise GenerateError("--prompt is empty; give a text such as 'a <new1> dog'")
        unknown = [t for t in TOKEN_RE.findall(p) if t not in known]
        unknown += [t for t in later if t not in unknown and mentions(p, t)]  # run tokens of later stages, in any form
        for t in unknown:
            why = (
                f"is learned at stage {later[t]}, but the model is restored after stage {stage}; pass --stage {later[t]} or later"
                if t in later and later[t] <= info.completed
                else f"is concept {later[t]} of the run, whose stage is not complete yet"
                if t in later
                else "is not a token of this run"
            )
            raise GenerateError(f"prompt {p!r}: token {t} {why}. Learned tokens ({span} of {info.run_dir}): {listing}.")


def default_out(info: RunInfo, stage: int, seed: int) -> Path:
    return info.run_dir / "generated" / f"stage{stage:02d}_seed{seed}"


def generate(
    run_dir: str | Path,
    prompts: list[str],
    n: int = 4,
    seed: int = 0,
    steps: int = 25,
    guidance: float | None = None,
    stage: int | None = None,
    out: str | Path | None = None,
    resolution: int | None = None,
    batch_size: int = 4,
    device: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Generate ``n`` images per prompt from the run's model after ``stage``; return the output folder."""
    info = read_run(run_dir)
    stage = check_stage(info, stage)
    if not prompts:
        raise GenerateError("no --prompt given; pass at least one, e.g. --prompt 'a <new1> dog'")
    check_prompt_tokens(prompts, info, stage)
    for name, v, lo in (("--n", n, 1), ("--steps", steps, 1), ("--batch-size", batch_size, 1)):
        if v < lo:
            raise GenerateError(f"{name}={v}: must be at least {lo}")
    guidance = info.guidance() if guidance is None else float(guidance)  # the run's model.guidance_scale by default
    res = int(resolution or info.resolution())
    if res < 8 or res % 8:
        raise GenerateError(f"--resolution={res}: must be a positive multiple of 8")
    out = Path(out).expanduser() if out else default_out(info, stage, seed)
    if out.exists() and not out.is_dir():
        raise GenerateError(f"--out {out} is a file; pick a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise GenerateError(f"--out {out} exists and is not empty; pick another folder (--out DIR) or pass --overwrite")

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    pipe, learned = load_run(info.run_dir, stage, device=dev)
    pipe.set_progress_bar_config(disable=True)

    with atomic_folder(out) as tmp:  # checked above: out absent, empty, or --overwrite
        records = []
        for pi, prompt in enumerate(prompts):
            files = []
            for start in range(0, n, batch_size):
                k = min(batch_size, n - start)
                gens = [torch.Generator(device=dev).manual_seed(seed + start + j) for j in range(k)]
                with torch.no_grad():
                    images = pipe(
                        prompt, num_images_per_prompt=k, generator=gens, num_inference_steps=steps,
                        guidance_scale=guidance, height=res, width=res,
                    ).images
                for j, im in enumerate(images):
                    name = f"p{pi:02d}_i{start + j:02d}.png"
                    im.save(tmp / name)
                    files.append(name)
            used = [c.token for c in learned if mentions(prompt, c.token)]
            records.append(dict(prompt=prompt, tokens=used, files=files, seeds=[seed + i for i in range(n)]))
        meta = dict(
            run_dir=str(info.run_dir.resolve()), stage=stage, device=str(dev), steps=steps, guidance=guidance, resolution=res, seed=seed, n=n,
            learned=[dict(stage=i + 1, token=c.token, name=c.name, class_name=c.class_name) for i, c in enumerate(learned)],
            prompts=records,
        )
        (tmp / "prompts.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(
        prog="python -m cns_lightning.generate",
        description="Generate images from a cns_lightning run; one prompt may combine any learned concept tokens.",
    )
    ap.add_argument("run_dir", metavar="RUN_DIR", help="run folder (holds config.yaml and stages/)")
    ap.add_argument("--prompt", action="append", required=True, help="a prompt, e.g. 'a <new1> dog next to a <new2> cat' (repeatable)")
    ap.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    ap.add_argument("--seed", type=int, default=0, help="image i uses seed+i (default 0)")
    ap.add_argument("--steps", type=int, default=25, help="inference steps (default 25)")
    ap.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the run's model.guidance_scale, 3.0 for model=micro, 6.0 for SD)")
    ap.add_argument("--stage", type=int, default=None, help="use the model after this stage (default: the last completed)")
    ap.add_argument("--out", default=None, help="output folder (default RUN_DIR/generated/stageNN_seedS)")
    ap.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: the run's data.resolution)")
    ap.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default 4)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 (default auto)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    args = ap.parse_args(argv)
    try:
        out = generate(
            args.run_dir, args.prompt, n=args.n, seed=args.seed, steps=args.steps, guidance=args.guidance, stage=args.stage,
            out=args.out, resolution=args.resolution, batch_size=args.batch_size, device=args.device, overwrite=args.overwrite,
        )
    except (GenerateError, RestoreError, CheckpointError, ConceptError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"[cns] {len(args.prompt) * args.n} images in {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
