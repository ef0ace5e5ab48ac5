"""Architectures of the micro models (one place, so pretraining, tests and benchmarks agree).

* micro CLIP: ViT vision tower (64 px, 8 px patches) + a 64-wide CLIP text tower over the real
  49,408-token CLIP vocabulary (77 positions). Its text tower is the micro pipeline's text encoder.
* micro VAE: ``AutoencoderKL`` 64 px -> 16 x 16 x 4 latents (factor 4, two downsamplings).
* micro UNet: ``UNet2DConditionModel`` on 16 x 16 x 4 latents (32/64/128 channels), attention on
  the 8 x 8 and 4 x 4 levels and the middle block (the 16 x 16 level is convolutions only, for CPU
  speed; ``attn2.to_k`` / ``attn2.to_v`` from the text states). ``UNET_ALL_LEVELS`` adds attention
  at 16 x 16, as SD-1.5 has at its highest latent resolution: pretrained and probed on the GPU, it
  did not learn the personal concepts better (docs/microworld.md, "What limits learning"), so the
  shipped UNet keeps the CPU-fast layout.
"""

from __future__ import annotations

import re

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


UNET_ALL_LEVELS = {**UNET, "down_block_types": ("CrossAttnDownBlock2D",) * 3, "up_block_types": ("CrossAttnUpBlock2D",) * 3}
UNET_LAYOUTS = {"low": UNET, "all": UNET_ALL_LEVELS}  # where cross-attention sits (pretrain --unet-attention)


def text_width(width: int) -> dict:
    """Text-tower overrides for another width (heads of 16 features, MLP 4x), for ``build_clip``."""
    return dict(hidden_size=width, intermediate_size=4 * width, num_attention_heads=max(1, width // 16))


def build_clip(**text_overrides) -> CLIPModel:
    text = CLIPTextConfig(**{**{k: v for k, v in TEXT.items() if k != "projection_dim"}, **text_overrides})
    vision = CLIPVisionConfig(**{k: v for k, v in VISION.items() if k != "projection_dim"})
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=TEXT["projection_dim"])
    return CLIPModel(cfg)


def build_vae(**kw) -> AutoencoderKL:
    return AutoencoderKL(**{**VAE, **kw})


def build_unet(attention: str = "low", **kw) -> UNet2DConditionModel:
    """The micro UNet; ``attention="all"`` puts cross-attention on the 16 x 16 level too."""
    return UNet2DConditionModel(**{**UNET_LAYOUTS[attention], **kw})


def warm_start(unet: UNet2DConditionModel, state: dict) -> list[str]:
    """Copy every weight of ``state`` (an earlier micro UNet) whose name and shape match into ``unet``.

    Transformer blocks that ``state`` lacks (attention added at a new level) get a zero ``proj_out``,
    so each is an identity on its residual path: the warm-started UNet computes exactly the earlier
    UNet's function until training moves the new blocks. Returns the names of the new blocks.

    A new text width (``cross_attention_dim``) changes only the cross-attention K/V shapes: those
    stay new, with ``attn2.to_v`` zero, so the UNet starts unconditional (each attn2 adds its output
    bias) rather than reading random values of a text space it has not seen; the first steps give
    ``to_v`` its gradient, then ``to_k``.
    """
    import torch

    own = unet.state_dict()
    same = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    unet.load_state_dict(same, strict=False)
    with torch.no_grad():
        for k, v in state.items():
            if k in own and own[k].shape != v.shape and k.endswith("attn2.to_v.weight"):
                own[k].zero_()  # state_dict() tensors share storage with the parameters
    blocks = sorted({re.match(r"(.*?\.attentions\.\d+)\.", k).group(1) for k in own if ".attentions." in k and k not in state})
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name in blocks:
                module.proj_out.weight.zero_()
                module.proj_out.bias.zero_()
    return blocks
