"""Architectures of the micro models (one place, so pretraining, tests and benchmarks agree).

* micro CLIP: ViT vision tower (64 px, 8 px patches) + a 64-wide CLIP text tower over the real
  49,408-token CLIP vocabulary (77 positions). Its text tower is the micro pipeline's text encoder.
* micro VAE: ``AutoencoderKL`` 64 px -> 16 x 16 x 4 latents (factor 4, two downsamplings).
* micro UNet: ``UNet2DConditionModel`` on 16 x 16 x 4 latents (32/64/128 channels), attention on
  the 8 x 8 and 4 x 4 levels (the 16 x 16 level is convolutions only, for CPU speed) (``attn2.to_k`` / ``attn2.to_v`` from the 64-wide text states).
"""

from __future__ import annotations

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from ..tokenizer import VOCAB_SIZE

TEXT = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=128,
)
VISION = dict(
    hidden_size=192,
    intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=6,
    image_size=64,
    patch_size=8,
    hidden_act="quick_gelu",
    projection_dim=128,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=16,
    sample_size=64,
)
UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT["hidden_size"],
    attention_head_dim=8,
    norm_num_groups=16,
)


def build_clip(**text_overrides) -> CLIPModel:
    text = CLIPTextConfig(**{**{k: v for k, v in TEXT.items() if k != "projection_dim"}, **text_overrides})
    vision = CLIPVisionConfig(**{k: v for k, v in VISION.items() if k != "projection_dim"})
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=TEXT["projection_dim"])
    return CLIPModel(cfg)


def build_vae(**kw) -> AutoencoderKL:
    return AutoencoderKL(**{**VAE, **kw})


def build_unet(**kw) -> UNet2DConditionModel:
    return UNet2DConditionModel(**{**UNET, **kw})
