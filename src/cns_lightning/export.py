"""Export a run as a standard diffusers ``StableDiffusionPipeline`` folder.

``python -m cns_lightning.export RUN_DIR OUT_DIR [--stage N] [--overwrite]``

The folder holds the model after stage N (default: the last completed) with every concept learned
by then: K/V weights written in, the concept tokens in the tokenizer and their rows in the text
encoder's (resized) embeddings, plus a ``README.md`` model card listing the tokens. It loads with
plain ``StableDiffusionPipeline.from_pretrained(OUT_DIR)``; no project code is needed.

A run with layer-wise tokens (Mix-of-Show's ED-LoRA, ``method.layerwise_tokens``) cannot be held
exactly by a plain pipeline, which feeds every cross-attention layer the same text states: its
export also writes ``cns_layerwise_tokens.json`` (each concept's layer tokens, in the tokenizer and
text encoder, in layer order), each concept token's row is the mean of its layer rows (what a plain
pipeline uses), and the model card and the command's console line say that this is an approximation.

The export is atomic: it is written to a hidden folder beside OUT_DIR and renamed at the end, so
OUT_DIR is either absent, untouched, or complete. A non-empty OUT_DIR is refused unless
``overwrite=True``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .checkpoint import CheckpointError, atomic_folder
from .concepts import Concept, ConceptError
from .methods.layerwise_tokens import installed
from .restore import CONFIG, RestoreError, check_stage, guidance_default, load_run, read_run

CARD = "README.md"
LAYERWISE_JSON = "cns_layerwise_tokens.json"
LAYERWISE_NOTE = (
    "This run trained layer-wise token embeddings (ED-LoRA: one embedding of each concept token per UNet "
    "cross-attention layer). A plain StableDiffusionPipeline feeds every layer the same text states, so in this "
    "folder each concept token holds the mean of its layer embeddings: an approximation of the trained model, not "
    "the model itself. The layer tokens are in the tokenizer and text encoder, listed per concept in layer order "
    f"in {LAYERWISE_JSON}. The trained model: `python -m cns_lightning.generate RUN_DIR`, or this folder's pipeline "
    "made layer-wise: `LayerwiseTokens.from_description(json.load(open(...)), pipe.tokenizer).install(pipe)` "
    "(cns_lightning.methods.layerwise_tokens)."
)


class ExportError(ValueError):
    """The export cannot be written as asked; the message names the folder and the fix."""


METHOD_LINES = {
    "cns": 'Concept Neuron Selection (Liao et al., "Continual Personalization for Diffusion Models", ICCV 2025): '
           "each concept changed only its own cross-attention K/V neurons and its own token.",
    "custom_diffusion": 'Custom Diffusion (Kumari et al., CVPR 2023): each concept trained the cross-attention K/V and its '
                        "token from the base model; the K/V here are their closed-form constrained merge.",
    "full_kv": "Every cross-attention K/V weight and the concept's token trained, one concept after the other.",
    "textual_inversion": "Textual inversion: only each concept's token embedding was trained.",
}


def method_line(cfg) -> str:
    """One sentence on how the run's method learned its concepts (the model card's)."""
    name = str(cfg.get("method", {}).get("name", "?"))
    return METHOD_LINES.get(name, f"Each concept was learned by method `{name}`.")


def model_card(run_dir: Path, stage: int, total: int, concepts: list[Concept], cfg, note: str = "") -> str:
    """The README.md of an exported folder: where it came from and the tokens it knows (and ``note``, a caveat)."""
    method = cfg.get("method", {}).get("name", "?")
    model = cfg.model.get("name") or cfg.model.get("_target_", "?")
    rows = "\n".join(f"| {i + 1} | `{c.token}` | {c.name} | {c.class_name} | {c.category} |" for i, c in enumerate(concepts))
    both = " and ".join(f"a {c.token} {c.class_name}" for c in concepts[:2])
    guidance = guidance_default(cfg)
    caveat = f"\n**Note.** {note}\n" if note else ""
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags:
- stable-diffusion
- continual-personalization
- concept-neuron-selection
---

# Continual personalization: {len(concepts)} concept(s) in one model

Exported by `python -m cns_lightning.export` from the run folder `{run_dir}` after stage
{stage} of {total} (method `{method}`, base model `{model}`, seed {cfg.get("seed", "?")}).
{method_line(cfg)} The folder holds one set of weights with every concept fused in (the method's
merge, where it has one), so any subset can be combined in one prompt.

## Concept tokens

| stage | token | concept | class noun | category |
|---|---|---|---|---|
{rows}

Write a token before its class noun, e.g. `{both}`.
{caveat}
## Use

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("path/to/this/folder")
image = pipe("{both}", num_inference_steps=25, guidance_scale={guidance:g}).images[0]
```
"""


def _refuse_target(out_dir: Path, run_dir: Path, overwrite: bool) -> None:
    out_abs, run_abs = out_dir.resolve(), run_dir.resolve()
    if out_abs == run_abs or out_abs in run_abs.parents or run_abs in out_abs.parents:
        raise ExportError(f"OUT_DIR={out_dir} is the run folder {run_dir}, inside it or above it; pick a folder outside the run, e.g. exports/<name>.")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"OUT_DIR={out_dir} is a file; pick a folder path that does not exist yet.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ExportError(f"OUT_DIR={out_dir} exists and is not empty; pick another folder, or pass --overwrite (overwrite=True) to replace it.")
        if (out_dir / CONFIG).is_file() and (out_dir / "stages").is_dir():
            raise ExportError(f"OUT_DIR={out_dir} is a run folder (config.yaml, stages/); --overwrite will not delete a run. Pick another folder.")


def write_legacy_vocab(tokenizer_dir: Path) -> None:
    """Add ``vocab.json`` / ``merges.txt`` / ``added_tokens.json`` / ``special_tokens_map.json``
    beside ``tokenizer.json`` (the files SD-1.5's tokenizer folder ships), taken from the saved
    ``tokenizer.json``, so readers of the slow-tokenizer format find them too."""
    fast = tokenizer_dir / "tokenizer.json"
    if not fast.is_file() or (tokenizer_dir / "vocab.json").is_file():
        return
    data = json.loads(fast.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        return
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab = model["vocab"]
    added = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t["content"] not in vocab}
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    if added:
        (tokenizer_dir / "added_tokens.json").write_text(json.dumps(added, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in config}
    (tokenizer_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def _normal_modes(folder: Path) -> None:
    """Give the export the usual modes (some savers write 0600 files; mkdtemp makes a 0700 folder)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def export_pipeline(run_dir: str | Path, out_dir: str | Path, stage: int | None = None, overwrite: bool = False, device: str = "cpu") -> Path:
    """Write the run's model after ``stage`` (default: last completed) as a diffusers folder ``out_dir``."""
    run_dir, out_dir = Path(run_dir).expanduser(), Path(out_dir).expanduser()
    info = read_run(run_dir)
    stage = check_stage(info, stage)  # errors before any work
    _refuse_target(out_dir, run_dir, overwrite)
    pipe, learned = load_run(run_dir, stage, device=device, tokens="learned")
    layerwise = installed(pipe)

    with atomic_folder(out_dir) as tmp:  # checked above: out_dir absent, empty, or non-empty with overwrite=True
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_legacy_vocab(tmp / "tokenizer")
        note = LAYERWISE_NOTE if layerwise is not None else ""
        (tmp / CARD).write_text(model_card(run_dir.resolve(), stage, len(info.concepts), learned, info.cfg, note), encoding="utf-8")
        if layerwise is not None:
            (tmp / LAYERWISE_JSON).write_text(json.dumps(layerwise.describe(learned, pipe.tokenizer), indent=2) + "\n", encoding="utf-8")
        (tmp / "cns_concepts.json").write_text(
            json.dumps(
                dict(
                    run_dir=str(run_dir.resolve()), stage=stage, total_stages=len(info.concepts), layerwise_tokens=layerwise is not None,
                    concepts=[dict(stage=i + 1, name=c.name, token=c.token, class_name=c.class_name, category=c.category) for i, c in enumerate(learned)],
                ),
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        _normal_modes(tmp)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m cns_lightning.export",
        description="Export a cns_lightning run as a standard diffusers StableDiffusionPipeline folder (with a README.md model card).",
    )
    ap.add_argument("run_dir", metavar="RUN_DIR", help="run folder (holds config.yaml and stages/)")
    ap.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (must not exist or be empty, unless --overwrite)")
    ap.add_argument("--stage", type=int, default=None, help="export the model after this stage (default: the last completed)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    ap.add_argument("--device", default="cpu", help="device to rebuild the model on (default: cpu)")
    args = ap.parse_args(argv)
    try:
        out = export_pipeline(args.run_dir, args.out_dir, stage=args.stage, overwrite=args.overwrite, device=args.device)
    except (RestoreError, ExportError, CheckpointError, ConceptError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"[cns] exported {args.run_dir} to {out}", file=sys.stderr)
    if (out / LAYERWISE_JSON).is_file():
        print(f"[cns] note: {LAYERWISE_NOTE}", file=sys.stderr)


if __name__ == "__main__":
    main()
