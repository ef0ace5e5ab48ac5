"""One sampler for prior images (prior.py) and evaluation (evaluation/protocol.py).

``Sampler`` holds the sampling copy of the UNet and VAE that ``prior.sampling_pipeline`` builds:
bf16 where the device supports it (CUDA with bf16; a CPU samples with the fp32 pipeline itself),
optionally ``torch.compile``d, whole (``compile``) or only its repeated transformer blocks
(``regional``, as diffusers' ``ModelMixin.compile_repeated_blocks``: one small graph compiled
once and reused by every block, so the compile takes seconds rather than minutes). The copy is
built once per process and refreshed in place from the live weights before each use (``bind``),
so evaluation after every stage reuses the compiled graphs of the prior images and of the previous
stages; it runs the live UNet's attention processors (``share_processors``: a method's own, such
as layer-wise tokens'). Text is encoded by the live pipeline's ``encode_prompt`` (the learned
tokens; a layer-wise pipeline's own) in the text encoder's precision, then cast to the sampler's. Images are uint8 tensors (n, H, W, 3) on the CPU
(``prior.sample_images``); each image has its own generator, so an image does not depend on the
batch it is in, on padding, or on how many ranks share the work.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .prior import DECODE_BATCH, PRECISIONS, sample_images, sampling_pipeline, sampling_precision

PAD_SEED = 2**31 - 1  # the generators of padding rows (their images are dropped)


def supported_precision(device: torch.device, precision: str) -> str:
    """The precision a sampler really runs in: bf16 / fp16 on a CUDA device that supports them,
    else fp32 (a CPU, or a GPU without bf16)."""
    precision = sampling_precision(device, precision)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp32"
    return precision


class Sampler:
    """Batched text-to-image sampling from a live pipeline (see the module docstring).

    ``precision``: "bf16" | "fp16" | "fp32" (what is asked; ``supported_precision`` says what runs).
    ``compile``: ``torch.compile`` the copy's UNet and VAE decoder (static shapes: every batch is
    padded to ``batch_size`` rows). ``regional``: with ``compile``, compile only the UNet's repeated
    blocks (``compile_repeated_blocks``) instead of the whole UNet. ``on_cpu``: keep ``precision``
    on a CPU too (to measure bf16 against fp32 there; slow, never the default).
    """

    def __init__(self, precision: str = "bf16", compile: bool = False, regional: bool = False, on_cpu: bool = False):
        if precision not in PRECISIONS:
            raise ValueError(f"sampler precision={precision!r} is not one of {', '.join(PRECISIONS)}")
        self.precision = str(precision)
        self.compile = bool(compile)
        self.regional = bool(regional)
        self.on_cpu = bool(on_cpu)
        self._pipe = None  # the live pipeline the copy was made from
        self._copy = None

    def settings(self) -> dict:
        return dict(precision=self.precision, compile=self.compile, regional=self.regional, on_cpu=self.on_cpu)

    def runs_in(self, device: torch.device) -> tuple[str, bool]:
        """(precision, compiled) this sampler samples in on ``device``: what prior images' cache key names."""
        precision = self.precision if (self.on_cpu and device.type == "cpu") else supported_precision(device, self.precision)
        return precision, self.compile and precision != "fp32"

    def bind(self, pipe) -> "Sampler":
        """Sample from ``pipe``'s current weights: the first call builds the copy, later calls copy
        the live UNet weights into it in place (the VAE is never trained), so compiled graphs stay valid."""
        precision, compiled = self.runs_in(pipe.unet.device)
        if precision == "fp32":
            self._pipe, self._copy = pipe, pipe
            return self
        if self._copy is None or self._pipe is not pipe:
            self._copy = sampling_pipeline(pipe, precision)
            share_processors(self._copy.unet, pipe.unet)
            if compiled:
                if self.regional:
                    self._copy.unet.compile_repeated_blocks(fullgraph=True, dynamic=False)
                else:
                    self._copy.unet.compile(fullgraph=True, dynamic=False)
                self._copy.vae.decoder.compile(fullgraph=True, dynamic=False)
            self._pipe = pipe
        else:
            refresh_weights(self._copy.unet, pipe.unet)
            share_processors(self._copy.unet, pipe.unet)
        return self

    @property
    def pipeline(self):
        if self._copy is None:
            raise RuntimeError("Sampler: call bind(pipe) before sampling")
        return self._copy

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.unet.dtype

    def release(self) -> None:
        """Free the sampling copy (its GPU memory); the next ``bind`` builds it again."""
        self._pipe = self._copy = None

    @torch.no_grad()
    def embed(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional ("") text embeddings (n, 77, d) of ``prompts`` by the live
        pipeline's text encoder (as diffusers computes them for classifier-free guidance), in the
        sampler's dtype."""
        pipe = self._pipe
        with _eval_mode(pipe):
            cond, uncond = pipe.encode_prompt(list(prompts), pipe.unet.device, 1, True)
        return cond.to(self.dtype), uncond.to(self.dtype)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, uncond: torch.Tensor, generators: list[torch.Generator], num_inference_steps: int,
               guidance_scale: float, resolution: int, batch_size: int | None = None) -> torch.Tensor:
        """uint8 images (n, H, W, 3) on the CPU, one per generator; ``cond`` / ``uncond``: (1 or n, 77, d).
        A compiled sampler pads the batch to ``batch_size`` rows (one shape, one graph)."""
        n = len(generators)
        cond, uncond = (e.expand(n, -1, -1) if e.shape[0] == 1 else e for e in (cond, uncond))
        _, compiled = self.runs_in(self.pipeline.unet.device)
        if compiled and batch_size and n < batch_size:
            extra = batch_size - n
            device = generators[0].device
            generators = list(generators) + [torch.Generator(device).manual_seed(PAD_SEED) for _ in range(extra)]
            cond, uncond = (torch.cat([e, e[-1:].expand(extra, -1, -1)]) for e in (cond, uncond))
        with _eval_mode(self.pipeline):
            images = sample_images(self.pipeline, cond, uncond, generators, num_inference_steps, guidance_scale, resolution,
                                   decode_batch=DECODE_BATCH, pad=compiled)
        return images[:n]


def share_processors(copy, live) -> None:
    """Give ``copy`` (a UNet built from ``live``'s config) ``live``'s attention processors, where
    they differ: a method's own routing (``methods.layerwise_tokens``: each cross-attention layer
    its own text states) must sample in the copy as in the live model. A compiled copy recompiles
    once after a change."""
    mine, theirs = copy.attn_processors, live.attn_processors
    if mine.keys() != theirs.keys():
        raise ValueError("the sampling copy's attention layers are not the live UNet's; rebuild the sampler (release, then bind)")
    if any(mine[k] is not theirs[k] for k in theirs):
        copy.set_attn_processor(dict(theirs))


def refresh_weights(copy: torch.nn.Module, live: torch.nn.Module) -> None:
    """Copy ``live``'s parameters and buffers into ``copy`` in place (cast to its dtype)."""
    src = live.state_dict()
    for name, dst in copy.state_dict().items():
        dst.copy_(src[name])


class _eval_mode:
    """The pipeline's UNet / text encoder / VAE in eval mode for the call, then as they were."""

    def __init__(self, pipe):
        self.mods = [m for m in (getattr(pipe, n, None) for n in ("unet", "text_encoder", "vae")) if isinstance(m, torch.nn.Module)]

    def __enter__(self):
        self.modes = [m.training for m in self.mods]
        for m in self.mods:
            m.eval()

    def __exit__(self, *exc):
        for m, was in zip(self.mods, self.modes):
            m.train(was)
