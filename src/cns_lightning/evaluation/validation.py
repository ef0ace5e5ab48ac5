"""Validation samples during a stage: every ``validation.every_n_steps`` training steps, images of
the stage's concept from ``validation.prompts``, logged to every logger (diffusers' training
scripts' ``--validation_prompt`` / ``--validation_steps``, kohya's ``--sample_every_n_steps``).

Off by default (``every_n_steps: 0``). Sampling runs on rank 0 under ``torch.no_grad`` with the
model in eval mode, then the modules' train/eval modes are restored; it draws its noise from its
own seeded CPU generators, so it changes neither the training RNG nor the trained weights.
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import torch
from PIL import Image

from ..concepts import Concept
from .loggers import log_images

__all__ = ["ValidationSamples", "validation_callback"]


class ValidationSamples(L.Callback):
    """Every ``every_n_steps`` steps of a stage (and after its last step): ``num_images`` samples per
    prompt of ``concept`` (``{token}`` / ``{class}`` filled in), one image row per prompt, logged
    as ``validation/<concept>/p<j>`` at the run's global step (``ContinualModule.step_offset`` +
    the stage's step)."""

    def __init__(self, pipe, concept: Concept, prompts: Sequence[str], every_n_steps: int, num_images: int = 2,
                 num_inference_steps: int = 25, guidance_scale: float = 6.0, resolution: int | None = None, seed: int = 0):
        self.pipe, self.concept = pipe, concept
        self.prompts = [concept.fill(p) for p in prompts]
        self.every, self.n, self.steps = int(every_n_steps), int(num_images), int(num_inference_steps)
        self.guidance, self.resolution, self.seed = float(guidance_scale), resolution, int(seed)
        self.logged_steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step >= (trainer.max_steps or 0):
            self.sample(trainer, int(getattr(pl_module, "step_offset", 0)) + step)

    @torch.no_grad()
    def sample(self, trainer, step: int) -> dict[str, Image.Image]:
        if not trainer.is_global_zero or step in self.logged_steps:
            return {}
        pipe = self.pipe
        modes = {m: m.training for m in (pipe.unet, pipe.text_encoder, pipe.vae)}
        for m in modes:
            m.eval()
        pipe.set_progress_bar_config(disable=True)
        res = self.resolution or None
        rows = {}
        try:
            for j, prompt in enumerate(self.prompts):
                gens = [torch.Generator(device="cpu").manual_seed(self.seed + 1000 * j + k) for k in range(self.n)]
                images = pipe(prompt, num_images_per_prompt=self.n, generator=gens, num_inference_steps=self.steps,
                              guidance_scale=self.guidance, height=res, width=res).images
                rows[f"validation/{self.concept.name}/p{j}"] = _row(images)
        finally:
            for m, training in modes.items():
                m.train(training)
        log_images(trainer.loggers, step, rows, captions={k: p for k, p in zip(rows, self.prompts)})
        self.logged_steps.append(step)
        return rows


def _row(images: list[Image.Image]) -> Image.Image:
    w, h = images[0].size
    out = Image.new("RGB", (w * len(images), h), "white")
    for k, im in enumerate(images):
        out.paste(im.convert("RGB"), (k * w, 0))
    return out


def validation_callback(cfg, pipe, concept: Concept, seed: int) -> ValidationSamples | None:
    """The callback of a stage from the run's ``validation`` node; None when it is off."""
    v = cfg.get("validation") or {}
    every = int(v.get("every_n_steps") or 0)
    if every <= 0:
        return None
    prompts = list(v.get("prompts") or []) or concept.eval_prompts()[:1]
    return ValidationSamples(
        pipe, concept, prompts, every, num_images=int(v.get("num_images", 2)), num_inference_steps=int(v.get("num_inference_steps", 25)),
        guidance_scale=float(v.get("guidance_scale") or cfg.model.get("guidance_scale") or 6.0), resolution=int(cfg.data.resolution), seed=seed,
    )
