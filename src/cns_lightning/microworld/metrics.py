"""Scores of the micro world, judged by the micro CLIP: CLIP-T, CLIP-I and zero-shot attribute accuracy.

Images are preprocessed exactly as the shipped ``CLIPProcessor`` does at 64 px (no resize or crop is
needed; scale to [0, 1], normalise with OpenAI CLIP's mean / std), without its per-image Python loop.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from . import world as W

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pixel_values(images: Sequence[Image.Image] | np.ndarray | torch.Tensor, device=None) -> torch.Tensor:
    """PIL images, an (N, H, W, 3) uint8 array, or an (N, 3, H, W) tensor in [0, 1] -> CLIP input."""
    if isinstance(images, torch.Tensor):
        x = images.float()
    else:
        arr = np.stack([np.asarray(im.convert("RGB")) for im in images]) if not isinstance(images, np.ndarray) else images
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255.0
    x = x.to(device) if device is not None else x
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def image_embeds(clip, images, batch: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings."""
    dev = next(clip.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        pv = pixel_values(images[i : i + batch], dev)
        e = clip.get_image_features(pixel_values=pv)
        e = e.pooler_output if hasattr(e, "pooler_output") else e
        out.append(torch.nn.functional.normalize(e.float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def text_embeds(clip, tokenizer, texts: Sequence[str], batch: int = 512) -> torch.Tensor:
    """L2-normalised text embeddings (77-token padding, as the pipeline tokenizes)."""
    dev = next(clip.parameters()).device
    out = []
    for i in range(0, len(texts), batch):
        ids = tokenizer(list(texts[i : i + batch]), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        e = clip.get_text_features(input_ids=ids.to(dev))
        e = e.pooler_output if hasattr(e, "pooler_output") else e
        out.append(torch.nn.functional.normalize(e.float(), dim=-1))
    return torch.cat(out)


def clip_t(clip, tokenizer, images, texts: Sequence[str]) -> float:
    """CLIP-T: mean cosine similarity between each image and its own prompt."""
    return float((image_embeds(clip, images) * text_embeds(clip, tokenizer, texts)).sum(-1).mean())


def clip_i(clip, images, references) -> float:
    """CLIP-I: mean cosine similarity between every image and every reference image."""
    return float((image_embeds(clip, images) @ image_embeds(clip, references).T).mean())


def attribute_accuracy(
    clip, tokenizer, images, scenes: Sequence[W.Scene], attributes: Sequence[str] = W.ATTRIBUTES
) -> dict[str, float]:
    """Zero-shot accuracy per attribute: the image's caption must beat every caption that differs
    only in that attribute (all values; chance = 1 / number of values)."""
    img = image_embeds(clip, images)
    out = {}
    for attr in attributes:
        values = W.attribute_values(attr)
        texts = [W.with_attribute(s, attr, v).caption() for s in scenes for v in values]
        txt = text_embeds(clip, tokenizer, texts).view(len(scenes), len(values), -1)
        pred = (txt @ img.unsqueeze(-1)).squeeze(-1).argmax(-1).cpu()
        truth = torch.tensor([values.index(_attr_of(s, attr)) for s in scenes])
        out[attr] = float((pred == truth).float().mean())
    return out


def pairwise_accuracy(clip, tokenizer, images, scenes: Sequence[W.Scene], rng: np.random.Generator) -> float:
    """How often the true caption outscores a caption with one attribute changed (chance 0.5)."""
    img = image_embeds(clip, images)
    true_t, wrong_t = [], []
    for s in scenes:
        attr = W.ATTRIBUTES[rng.integers(len(W.ATTRIBUTES))]
        values = [v for v in W.attribute_values(attr) if v != _attr_of(s, attr)]
        true_t.append(s.caption())
        wrong_t.append(W.with_attribute(s, attr, values[rng.integers(len(values))]).caption())
    a = (img * text_embeds(clip, tokenizer, true_t)).sum(-1)
    b = (img * text_embeds(clip, tokenizer, wrong_t)).sum(-1)
    return float((a > b).float().mean())


def chance(attr: str) -> float:
    return 1.0 / len(W.attribute_values(attr))


def _attr_of(scene: W.Scene, attr: str) -> str:
    return getattr(scene, attr) if attr in ("background", "style") else getattr(scene.objects[0], attr)
