"""The LightningDataModule: one concept's images and captions, paired with prior images.

Every sample is one concept image (with its caption, token written in) and one prior image of
the concept's class (with the class prompt). Images are resized on their short side, centre-
(or randomly) cropped to ``resolution`` and flipped with probability ``flip_p``. When the crop is
deterministic the VAE posterior (mean, std) of every image and of its mirror image is computed
once (``cache_latents``) and each step samples from it, which is what encoding every step would
do, at none of the cost. The prior images' posteriors are also kept on disk beside the prior
images (a prior cache folder of prior.py), so later stages and runs skip encoding them.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .checkpoint import CheckpointError, hash_tensors, load_tensors, save_tensors
from .concepts import Concept
from .images import load_image


def to_tensor(img: Image.Image, resolution: int, random_crop: bool = False, rng: np.random.Generator | None = None) -> torch.Tensor:
    """Resize the short side to ``resolution``, crop a square, scale to [-1, 1] (3 x H x W)."""
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    if random_crop and rng is not None:
        left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    else:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


class PairedDataset(Dataset):
    """Concept image i (and its caption) with prior image j; pixels or cached latents."""

    def __init__(self, instance: dict, prior: dict | None, flip_p: float, random_crop: bool, resolution: int, seed: int):
        self.instance, self.prior = instance, prior
        self.flip_p, self.random_crop, self.resolution = flip_p, random_crop, resolution
        self.seed = seed

    def __len__(self) -> int:
        return len(self.instance["ids"])

    def _item(self, part: dict, i: int, prefix: str, rng: np.random.Generator) -> dict:
        flip = bool(rng.random() < self.flip_p)
        i = i % len(part["ids"])
        out = {f"{prefix}_input_ids": part["ids"][i]}
        if "mean" in part:
            out[f"{prefix}_mean"] = part["mean"][int(flip)][i]
            out[f"{prefix}_std"] = part["std"][int(flip)][i]
        else:
            x = to_tensor(part["images"][i], self.resolution, self.random_crop, rng)
            out[f"{prefix}_pixels"] = torch.flip(x, dims=[2]) if flip else x
        return out

    def __getitem__(self, idx: int) -> dict:
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,))))
        item = self._item(self.instance, idx, "instance", rng)
        if self.prior is not None:
            j = int(rng.integers(0, len(self.prior["ids"])))
            item.update(self._item(self.prior, j, "prior", rng))
        return item


class ConceptDataModule(L.LightningDataModule):
    def __init__(
        self,
        concept: Concept,
        tokenizer,
        resolution: int,
        steps: int,
        batch_size: int = 2,
        prior_images: list[Path] | None = None,
        prior_prompt: str | None = None,
        vae=None,
        cache_latents: bool = True,
        random_crop: bool = False,
        flip_p: float = 0.5,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
    ):
        super().__init__()
        self.concept, self.tokenizer, self.resolution = concept, tokenizer, int(resolution)
        self.steps, self.batch_size = int(steps), int(batch_size)
        self.prior_images, self.prior_prompt = prior_images, prior_prompt
        self.vae, self.cache_latents = vae, cache_latents and not random_crop and vae is not None
        self.random_crop, self.flip_p, self.num_workers, self.seed = random_crop, float(flip_p), int(num_workers), seed
        self.cache_dir = cache_dir
        self.dataset: PairedDataset | None = None

    def _encoding(self) -> tuple[torch.device, torch.dtype, bool]:
        """Where and how the VAE encodes: bf16 autocast on CUDA when the Trainer trains in bf16."""
        device, dtype = next(self.vae.parameters()).device, next(self.vae.parameters()).dtype
        precision = str(getattr(self.trainer, "precision", "32-true")) if self.trainer is not None else "32-true"
        return device, dtype, device.type == "cuda" and "bf16" in precision

    def _part(self, images: list[Image.Image], captions: list[str]) -> dict:
        part = {"ids": tokenize(self.tokenizer, captions)}
        if not self.cache_latents:
            part["images"] = images
            return part
        x = torch.stack([to_tensor(im, self.resolution) for im in images])
        device, dtype, bf16 = self._encoding()
        # On CUDA: 8 images at a time (200 prior images at 512 px in one batch would need tens of
        # GiB of activations). CPU: fp32, one batch.
        chunk = 8 if device.type == "cuda" else len(x)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
        means, stds = [], []
        with torch.no_grad(), autocast:
            for variant in (x, torch.flip(x, dims=[3])):
                m, s = [], []
                for i in range(0, len(variant), max(1, chunk)):
                    dist = self.vae.encode(variant[i : i + chunk].to(device, dtype)).latent_dist
                    m.append(dist.mean.float().cpu())
                    s.append(dist.std.float().cpu())
                means.append(torch.cat(m))
                stds.append(torch.cat(s))
        part["mean"], part["std"] = means, stds
        return part

    def _prior_latents_file(self) -> Path | None:
        """Where the prior images' VAE posteriors are kept: beside the images, in a finished prior
        cache folder (prior.py), keyed by the VAE, the image list, the resolution and the precision."""
        folders = {Path(p).parent for p in self.prior_images}
        if not self.cache_latents or len(folders) != 1 or not (next(iter(folders)) / "done.json").is_file():
            return None
        _, _, bf16 = self._encoding()
        h = hashlib.sha256()
        h.update(json.dumps(dict(self.vae.config), sort_keys=True, default=str).encode())
        quant = getattr(self.vae, "quant_conv", None)
        hash_tensors([self.vae.encoder.conv_in.weight] + ([quant.weight] if quant is not None else []), h)
        h.update(json.dumps([Path(p).name for p in self.prior_images] + [self.resolution, "bf16" if bf16 else "fp32"]).encode())
        return next(iter(folders)) / f"latents-{h.hexdigest()[:16]}.safetensors"

    def _prior_part(self) -> dict:
        cache = self._prior_latents_file()
        ids = tokenize(self.tokenizer, [self.prior_prompt] * len(self.prior_images))
        if cache is not None and cache.is_file():
            try:
                t = load_tensors(cache)
                if t["mean0"].shape[0] == len(self.prior_images):
                    return {"ids": ids, "mean": [t["mean0"], t["mean1"]], "std": [t["std0"], t["std1"]]}
            except (CheckpointError, KeyError):
                pass  # unreadable: encode again and overwrite
        prior_imgs = [load_image(p, reduce_to=self.resolution) for p in self.prior_images]
        part = self._part(prior_imgs, [self.prior_prompt] * len(prior_imgs))
        if cache is not None:
            save_tensors(cache, {"mean0": part["mean"][0], "mean1": part["mean"][1], "std0": part["std"][0], "std1": part["std"][1]})
        return part

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        paths = self.concept.image_paths(self.cache_dir)
        images = [load_image(p, min_side=self.resolution // 4, reduce_to=self.resolution) for p in paths]
        instance = self._part(images, self.concept.captions(self.cache_dir))
        prior = self._prior_part() if self.prior_images else None
        self.dataset = PairedDataset(instance, prior, self.flip_p, self.random_crop, self.resolution, self.seed)

    def train_dataloader(self) -> DataLoader:
        # Under DDP every rank draws its own samples (Lightning's distributed sampler is off:
        # src/cns_lightning/conf/trainer/ddp.yaml), from a stream seeded by the stage seed and the rank.
        rank = self.trainer.global_rank if self.trainer is not None else 0
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * rank)
        sampler = RandomSampler(self.dataset, replacement=True, num_samples=self.steps * self.batch_size, generator=g)
        return DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, drop_last=True, pin_memory=torch.cuda.is_available(),
        )
