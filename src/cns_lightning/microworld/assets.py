"""The shipped micro-world models (``src/cns_lightning/assets/micro``).

* ``pipeline/``: a ``StableDiffusionPipeline`` folder (micro VAE, UNet, CLIP text encoder, the real
  CLIP tokenizer, SD-1.5's PNDM scheduler); loads with plain diffusers, no project code.
* ``clip/``: the micro ``CLIPModel`` + ``CLIPProcessor`` (the evaluator for CLIP-I / CLIP-T here).

Hydra: ``model=micro`` targets ``micro_pipeline``; evaluation code may call ``micro_clip()``.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "assets" / "micro"
PIPELINE_DIR = ROOT / "pipeline"
CLIP_DIR = ROOT / "clip"


def pipeline_path() -> str:
    """Absolute path of the shipped micro pipeline folder."""
    return str(PIPELINE_DIR)


def clip_path() -> str:
    """Absolute path of the shipped micro CLIP folder."""
    return str(CLIP_DIR)


def micro_pipeline(path: str | None = None, **kw):
    """Load the shipped micro Stable Diffusion pipeline (or ``path``) via ``models.load_pipeline``."""
    from ..models import load_pipeline

    return load_pipeline(path or pipeline_path(), **kw)


def micro_clip(path: str | None = None):
    """(CLIPModel in eval mode, CLIPTokenizer) of the shipped micro CLIP evaluator (or ``path``)."""
    from transformers import CLIPModel, CLIPTokenizer

    folder = Path(path or clip_path())
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"micro CLIP folder {folder} has no config.json; pass evaluator path=/abs/path/to/a/CLIPModel folder "
            "or reinstall the package (src/cns_lightning/assets/micro/clip ships with it)."
        )
    return CLIPModel.from_pretrained(folder).eval(), CLIPTokenizer.from_pretrained(folder)
