"""CLIP-I, CLIP-T and DINO similarity, following Custom Diffusion's evaluation script.

Conventions (``customconcept101/evaluate.py`` of adobe-research/custom-diffusion, which the CNS
paper follows; all reported x 100):

* CLIP-I (:func:`clip_image_similarity`): mean cosine between the CLIP image embeddings of every
  generated image and every reference image of the concept (all pairs).
* CLIP-T (:func:`clip_text_score`): CLIPScore (Hessel et al. 2021), ``2.5 * max(cos(image,
  text), 0)`` per image, averaged; the text is the prompt *without* the modifier token.
* DINO (:func:`dino_image_similarity`): as CLIP-I with DINO CLS features (in the micro world: the
  micro identity model, ``microworld/identity.py``, loaded by the same :func:`load_dino`).

Preprocessing matches the script: CLIP resizes the short side to 224 (bicubic), centre-crops 224
and normalises with CLIP's mean/std (``CLIPImageProcessorPil``, which needs no torchvision); DINO
resizes to 256, centre-crops 224 and normalises with ImageNet mean/std (a model smaller than 224 px
with a ``preprocessor_config.json`` uses that file's size and mean/std: :func:`dino_preprocessing`).

Why not torchmetrics' ``CLIPScore``: it can take a preloaded model (a callable returning
``(model, processor)``), but (1) with transformers >= 5 ``get_image_features`` returns a
``ModelOutput`` and torchmetrics 1.9 fails on it (``'BaseModelOutputWithPooling' object has no
attribute 'norm'``), (2) it clamps the *mean* score at 0 instead of each image's score, has no
2.5 weight, and its image-image mode compares images pairwise by index, not all pairs as CLIP-I
needs. So the cosines are computed here directly, in a few lines, from the model's embeddings.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
CLIPSCORE_WEIGHT = 2.5  # Hessel et al. 2021; Custom Diffusion's get_clip_score(w=2.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- the equations
def clip_image_similarity(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """CLIP-I = 100 x mean over all (generated, reference) pairs of cos(E_gen, E_ref).

    ``generated`` (n x e) and ``reference`` (m x e) are L2-normalised image embeddings.
    Custom Diffusion ``clipeval_image``: ``np.mean(image_feats @ image_feats_ref.T)``.
    """
    return float(100.0 * (generated @ reference.T).mean())


def per_image_similarity(generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """100 x mean cosine of each generated image to all references (n,): CLIP-I of one image.

    Its mean over images equals :func:`clip_image_similarity`; used for best-of-N selection.
    """
    return 100.0 * (generated @ reference.T).mean(dim=1)


def clip_text_score(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """CLIP-T per image = 100 x 2.5 x max(cos(E_image, E_text), 0) (CLIPScore, w = 2.5).

    ``images`` and ``texts`` are L2-normalised (n x e), row k of one paired with row k of the
    other. Custom Diffusion ``get_clip_score``: ``w * np.clip(np.sum(images * candidates,
    axis=1), 0, None)``. The caller averages (and passes the prompt without modifier token).
    """
    return 100.0 * CLIPSCORE_WEIGHT * (images * texts).sum(dim=-1).clamp(min=0)


def dino_image_similarity(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """DINO = 100 x mean over all pairs of cos(F_gen, F_ref), F = DINO CLS features (normalised)."""
    return clip_image_similarity(generated, reference)


def self_similarity(reference: torch.Tensor) -> float:
    """100 x mean cos between a concept's own reference images, self-pairs excluded: the score its
    samples would reach if they were as alike to the references as the references are to each other."""
    n = len(reference)
    if n < 2:
        return float("nan")
    s = reference @ reference.T
    return float(100.0 * (s.sum() - s.diagonal().sum()) / (n * (n - 1)))


def learned(score: float, base: float, reference: float) -> bool:
    """Issue 14's rule for "the concept was learned": its score closes at least half of the gap
    between the base model's samples for the class prompt (``base``) and the references' own
    similarity (``reference``, :func:`self_similarity`)."""
    return bool(score - base >= 0.5 * (reference - base))


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-12)


def _features(out) -> torch.Tensor:
    """transformers < 5 returns a tensor, >= 5 a ModelOutput whose pooler_output is projected."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ----------------------------------------------------------------------------- image preprocessing
def resized_size(w: int, h: int, resize: int) -> tuple[int, int]:
    """torchvision ``Resize(int)``: short side -> ``resize``, long side ``int(resize * long / short)``.

    (transformers' CLIP image processor rounds the long side instead, one pixel off for some sizes;
    Custom Diffusion and OpenAI CLIP use torchvision, so we follow it.)
    """
    return (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)


def _resize_crop(image: Image.Image, resize: int, crop: int) -> np.ndarray:
    """Short side to ``resize`` (bicubic), centre crop ``crop`` x ``crop``, float HWC in [0, 1]."""
    image = image.convert("RGB")
    image = image.resize(resized_size(*image.size, resize), Image.BICUBIC)
    w, h = image.size
    # torchvision CenterCrop: offsets int(round((side - crop) / 2)).
    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    return np.asarray(image, dtype=np.float32) / 255.0


def preprocess(images: Sequence[Image.Image], resize: int, crop: int, mean, std) -> torch.Tensor:
    """Images -> normalised (n, 3, crop, crop) tensor (Custom Diffusion's torchvision Compose)."""
    arr = np.stack([_resize_crop(im, resize, crop) for im in images])
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- CLIP
@dataclass
class ClipScorer:
    """A CLIP model with its tokenizer and image preprocessing; embeds images and texts."""

    model: torch.nn.Module
    tokenizer: object
    image_size: int
    name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 64

    def to(self, device) -> "ClipScorer":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return preprocess(images, self.image_size, self.image_size, CLIP_MEAN, CLIP_STD)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised CLIP image embeddings (n x e), float32 on CPU."""
        out = []
        for i in range(0, len(images), self.batch_size):
            px = self.pixel_values(images[i : i + self.batch_size]).to(self.device, self._dtype())
            out.append(_features(self.model.get_image_features(pixel_values=px)).float().cpu())
        return _normalise(torch.cat(out))

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised CLIP text embeddings (n x e), float32 on CPU; texts truncated to 77 tokens."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(
                list(texts[i : i + self.batch_size]), padding=True, truncation=True, max_length=77, return_tensors="pt"
            )
            feats = self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
            )
            out.append(_features(feats).float().cpu())
        return _normalise(torch.cat(out))

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def build_tiny_clip(seed: int = 0) -> ClipScorer:
    """A tiny random CLIP (32 px images, 32-wide towers) with the real CLIP tokenizer.

    For tests and ``model=tiny`` runs: the numbers are meaningless but computed exactly as with
    the real ViT-B/32.
    """
    from transformers import CLIPConfig, CLIPModel

    from ..tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        cfg = CLIPConfig(
            text_config=dict(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ),
            vision_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
            ),
            projection_dim=32,
        )
        model = CLIPModel(cfg).eval()
    finally:
        torch.random.set_rng_state(gen_state)
    return ClipScorer(model=model, tokenizer=tokenizer, image_size=32, name=f"tiny-random-clip(seed={seed})")


def load_clip(path: str | os.PathLike = DEFAULT_CLIP, device="cpu") -> ClipScorer:
    """Load a CLIP model (hub id or local folder saved with ``save_pretrained``)."""
    from transformers import CLIPModel, CLIPTokenizer

    local = Path(os.path.expanduser(str(path)))
    src = str(local) if local.exists() else str(path)
    try:
        model = CLIPModel.from_pretrained(src).eval()
        tokenizer = CLIPTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:  # missing folder / unreachable hub / invalid repo id
        raise FileNotFoundError(
            f"eval.clip_path={str(path)!r} could not be loaded ({e.__class__.__name__}: {str(e).splitlines()[0]}). "
            f"Download it elsewhere (huggingface-cli download {DEFAULT_CLIP}), copy the folder, and pass "
            "eval.clip_path=/abs/path/to/it; or eval.clip_preset=tiny for a random CLIP (smoke tests only)."
        ) from e
    size = int(model.config.vision_config.image_size)
    return ClipScorer(model=model, tokenizer=tokenizer, image_size=size, name=str(path)).to(device)


def make_clip(clip_path: str | None, clip_preset: str | None, device="cpu", seed: int = 0) -> ClipScorer:
    """``clip_path`` wins; else ``clip_preset`` ('tiny' or 'default' = openai/clip-vit-base-patch32)."""
    if clip_path:
        return load_clip(clip_path, device)
    if clip_preset in (None, "default", "vit-b-32"):
        return load_clip(DEFAULT_CLIP, device)
    if clip_preset == "tiny":
        return build_tiny_clip(seed).to(device)
    raise ValueError(f"eval.clip_preset={clip_preset!r}: choose 'tiny', 'default', or set eval.clip_path")


# ----------------------------------------------------------------------------- DINO
@dataclass
class DinoScorer:
    """A DINO ViT (transformers ``AutoModel``); CLS features of the last layer.

    Images are resized (short side) to ``resize``, centre-cropped to ``crop`` and normalised with
    ``mean`` / ``std`` (Custom Diffusion's DINO recipe by default: 256, 224, ImageNet).
    """

    model: torch.nn.Module
    name: str
    crop: int = 224
    resize: int = 256
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 64
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def to(self, device) -> "DinoScorer":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            px = preprocess(images[i : i + self.batch_size], self.resize, self.crop, self.mean, self.std)
            px = px.to(self.device, next(self.model.parameters()).dtype)
            out.append(self.model(pixel_values=px).last_hidden_state[:, 0].float().cpu())
        return _normalise(torch.cat(out))


def dino_preprocessing(folder: Path, model_size: int) -> dict:
    """``resize`` / ``crop`` / ``mean`` / ``std`` for a DINO folder.

    Custom Diffusion's recipe (short side 256, centre crop 224, ImageNet mean / std) is for 224 px
    models and is kept for them, whatever their ``preprocessor_config.json`` says. A smaller model
    whose folder has a ``preprocessor_config.json`` (the 64 px micro identity model,
    ``microworld/identity.py``) sees the whole image: resized to the processor's size (no border
    crop: a 64 -> 73 -> 64 crop would cut away a style's frame) with the processor's mean / std.
    """
    cfg_file = folder / "preprocessor_config.json"
    default = dict(crop=model_size, resize=round(model_size * 256 / 224), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if model_size >= 224 or not cfg_file.is_file():
        return default
    try:
        cfg = json.loads(cfg_file.read_text())
        size = cfg.get("size", model_size)
        if isinstance(size, dict):
            size = size.get("height", size.get("shortest_edge", model_size))
        mean, std = tuple(float(v) for v in cfg.get("image_mean", IMAGENET_MEAN)), tuple(float(v) for v in cfg.get("image_std", IMAGENET_STD))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("image_mean / image_std need 3 values")
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{cfg_file}: unreadable preprocessing ({e}); fix or delete the file") from e
    return dict(crop=int(size), resize=int(size), mean=mean, std=std)


def load_dino(path: str | os.PathLike, device="cpu") -> DinoScorer:
    """Load a DINO ViT from a hub id (e.g. facebook/dino-vits16) or a local folder
    (preprocessing: :func:`dino_preprocessing`)."""
    from transformers import AutoModel

    local = Path(os.path.expanduser(str(path)))
    try:
        model = AutoModel.from_pretrained(str(local) if local.exists() else str(path)).eval()
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"eval.dino_path={str(path)!r} could not be loaded ({e.__class__.__name__}). Download e.g. "
            "facebook/dino-vits16 elsewhere and pass eval.dino_path=/abs/path, or eval.dino_path=null to skip DINO."
        ) from e
    prep = dino_preprocessing(local, int(getattr(model.config, "image_size", 224)))
    return DinoScorer(model=model, name=str(path), **prep).to(device)
