"""Stable Diffusion pipelines: real weights from a folder or hub id, or random SD-shaped ones.

Every builder returns a plain diffusers ``StableDiffusionPipeline`` (safety checker off), so the
rest of the project, and anything a user exports, stays a standard diffusers object.

* ``load_pipeline(path)``: any SD-1.x diffusers folder or hub id (``model=sd15 model.path=...``).
* ``build_random_pipeline("tiny")``: a random SD-shaped pipeline that builds in a second (tests).
* ``build_random_pipeline("sd15")``: the exact SD-1.5 architecture with random weights
  (859.5 M UNet parameters, 32 cross-attention K/V tensors, 19.17 M K/V parameters): the same
  FLOPs and memory as the real model, for GPU benchmarks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .tokenizer import clip_tokenizer

# Architecture presets. ``sd15`` is SD-1.5's published config (runwayml/stable-diffusion-v1-5).
PRESETS: dict[str, dict] = {
    "tiny": dict(
        resolution=32,
        unet=dict(
            sample_size=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        ),
        vae=dict(
            block_out_channels=(16, 32, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=32,
        ),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
    ),
    "sd15": dict(
        resolution=512,
        unet=dict(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=dict(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            norm_num_groups=32,
            sample_size=512,
        ),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768),
    ),
}



class ModelInputError(FileNotFoundError, ValueError):
    """A model config that cannot be loaded (``model.path``, ``model.preset``); the message names the field and the fix."""

def _scheduler() -> PNDMScheduler:
    """SD-1.5's shipped scheduler config (scaled_linear betas, 1000 steps, epsilon prediction)."""
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_random_pipeline(preset: str = "tiny", seed: int = 0, **_: object) -> StableDiffusionPipeline:
    """A pipeline with the architecture ``preset`` (see ``PRESETS``) and seeded random weights."""
    if preset not in PRESETS:
        raise ModelInputError(f"model.preset={preset!r} is not a known architecture; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **cfg["text"],
        )
    )
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"], scaling_factor=0.18215)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(path: str, **_: object) -> StableDiffusionPipeline:
    """Load any SD-1.x diffusers pipeline from a local folder or a hub id.

    Offline machines: download once elsewhere (``huggingface-cli download
    stable-diffusion-v1-5/stable-diffusion-v1-5``), copy the folder, and pass
    ``model.path=/abs/path/to/folder``.
    """
    local = Path(os.path.expanduser(str(path)))
    looks_local = local.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1
    if looks_local and not (local / "model_index.json").is_file():
        raise ModelInputError(
            f"model.path={path!r}: no diffusers pipeline folder there (expected {local / 'model_index.json'}). "
            "Pass model.path=/abs/path/to/a/StableDiffusionPipeline folder (one with model_index.json, unet/, "
            "vae/, text_encoder/, tokenizer/, scheduler/), or a hub id such as "
            "stable-diffusion-v1-5/stable-diffusion-v1-5 on a machine that can reach the hub."
        )
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(local) if looks_local else str(path),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except OSError as e:  # hub unreachable, repo missing, no cached snapshot
        raise ModelInputError(
            f"model.path={path!r} could not be loaded ({e.__class__.__name__}: {str(e).splitlines()[0]}). "
            "Without hub access, download the model elsewhere and pass model.path=/abs/path/to/the/folder."
        ) from e
    check_sd_unet(pipe.unet, where=str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_sd_unet(unet: torch.nn.Module, where: str = "model") -> None:
    """Fail clearly unless ``unet`` has SD-style cross-attention K/V layers."""
    if not any(name.endswith("attn2.to_k") for name, _ in unet.named_modules()):
        raise ModelInputError(
            f"{where}: the UNet has no cross-attention (no 'attn2.to_k' modules); CNS needs an SD-style "
            "UNet2DConditionModel with text cross-attention."
        )


def cross_attention_kv(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every cross-attention ``attn2.to_k`` / ``attn2.to_v`` weight (out x d), by parameter name."""
    return {
        name: p
        for name, p in unet.named_parameters()
        if (".attn2.to_k." in name or ".attn2.to_v." in name) and name.endswith("weight")
    }
