"""CLIP-I / CLIP-T / DINO against direct computations from the models' own embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cns_lightning.evaluation.metrics import (
    CLIP_MEAN,
    CLIP_STD,
    build_tiny_clip,
    clip_image_similarity,
    clip_text_score,
    dino_image_similarity,
    load_clip,
    load_dino,
    make_clip,
    per_image_similarity,
    preprocess,
    resized_size,
)


def _images(n: int, seed: int, size=(40, 28)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def clip():
    return build_tiny_clip(seed=3)


def _raw_image_features(clip, images):
    with torch.no_grad():
        out = clip.model.get_image_features(pixel_values=clip.pixel_values(images))
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _raw_text_features(clip, texts):
    tok = clip.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clip.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_clip_i_is_mean_cosine_over_all_pairs(clip):
    gen, ref = _images(3, 0), _images(4, 1, size=(33, 50))
    g, r = _raw_image_features(clip, gen), _raw_image_features(clip, ref)
    by_hand = 100 * np.mean([F.cosine_similarity(g[a], r[b], dim=0).item() for a in range(3) for b in range(4)])
    value = clip_image_similarity(clip.image_embeddings(gen), clip.image_embeddings(ref))
    assert value == pytest.approx(by_hand, abs=1e-4)
    per = per_image_similarity(clip.image_embeddings(gen), clip.image_embeddings(ref))
    assert per.shape == (3,) and float(per.mean()) == pytest.approx(by_hand, abs=1e-4)
    assert clip_image_similarity(clip.image_embeddings(gen[:1]), clip.image_embeddings(gen[:1])) == pytest.approx(100.0, abs=1e-3)


def test_clip_t_is_clipscore_with_weight_2_5_clamped_per_image():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(6, 8), dim=-1)
    txt = F.normalize(torch.randn(6, 8), dim=-1)
    txt[0] = img[0]  # cos 1 -> 250
    txt[1] = -img[1]  # cos -1 -> 0, not negative
    s = clip_text_score(img, txt)
    by_hand = [250 * max(F.cosine_similarity(img[k], txt[k], dim=0).item(), 0.0) for k in range(6)]
    assert s.tolist() == pytest.approx(by_hand, abs=1e-4)
    assert s[0].item() == pytest.approx(250.0, abs=1e-4) and s[1].item() == 0.0


def test_clip_t_from_model_embeddings(clip):
    images, texts = _images(2, 5), ["a dog in the snow", "a red mug"]
    i, t = _raw_image_features(clip, images), _raw_text_features(clip, texts)
    by_hand = [250 * max(F.cosine_similarity(i[k], t[k], dim=0).item(), 0.0) for k in range(2)]
    s = clip_text_score(clip.image_embeddings(images), clip.text_embeddings(texts))
    assert s.tolist() == pytest.approx(by_hand, abs=1e-3)


def test_preprocessing_matches_transformers_clip_image_processor():
    """Our torchvision-free Resize(224, bicubic) + CenterCrop(224) + CLIP normalisation."""
    from transformers import CLIPImageProcessorPil

    for size in [(300, 230), (230, 300), (512, 512), (32, 32)]:
        ims = _images(2, 7, size=size)
        ours = preprocess(ims, 224, 224, CLIP_MEAN, CLIP_STD)
        theirs = CLIPImageProcessorPil()(images=ims, return_tensors="pt")["pixel_values"]
        assert ours.shape == theirs.shape == (2, 3, 224, 224)
        assert torch.allclose(ours, theirs, atol=1e-5), (size, (ours - theirs).abs().max())
    # The long side is truncated as torchvision does (335.7 -> 335; transformers rounds to 336).
    assert resized_size(640, 427, 224) == (335, 224) and resized_size(427, 640, 224) == (224, 335)


def test_local_clip_folder_round_trip(tmp_path, clip):
    clip.model.save_pretrained(tmp_path / "clip")
    clip.tokenizer.save_pretrained(tmp_path / "clip")
    loaded = load_clip(tmp_path / "clip")
    ims = _images(2, 9)
    assert loaded.image_size == 32 and loaded.name == str(tmp_path / "clip")
    assert torch.allclose(loaded.image_embeddings(ims), clip.image_embeddings(ims), atol=1e-5)
    assert torch.allclose(loaded.text_embeddings(["a cat"]), clip.text_embeddings(["a cat"]), atol=1e-5)


def test_missing_clip_names_the_key_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.clip_path"):
        load_clip(tmp_path / "no_such_clip")
    with pytest.raises(ValueError, match="clip_preset"):
        make_clip(None, "vit-h", "cpu")


def test_dino_similarity_with_a_tiny_random_vit(tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8),
             add_pooling_layer=False).save_pretrained(tmp_path / "dino")
    dino = load_dino(tmp_path / "dino")
    gen, ref = _images(2, 11), _images(3, 12)
    with torch.no_grad():
        g = dino.model(pixel_values=preprocess(gen, dino.resize, dino.crop, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))).last_hidden_state[:, 0]
        r = dino.model(pixel_values=preprocess(ref, dino.resize, dino.crop, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))).last_hidden_state[:, 0]
    by_hand = 100 * np.mean([F.cosine_similarity(g[a], r[b], dim=0).item() for a in range(2) for b in range(3)])
    assert (dino.crop, dino.resize) == (32, 37)
    assert dino_image_similarity(dino.image_embeddings(gen), dino.image_embeddings(ref)) == pytest.approx(by_hand, abs=1e-4)


def test_self_similarity_and_the_learned_rule():
    from cns_lightning.evaluation.metrics import learned, self_similarity

    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), dim=-1)
    # off-diagonal cosines: 0.7071 (twice), 0 and 0.7071 (twice) ... mean of the 6 ordered pairs
    expected = 100 * (4 * 2**-0.5 + 2 * 0.0) / 6
    assert self_similarity(e) == pytest.approx(expected)
    assert math.isnan(self_similarity(e[:1]))
    assert learned(35.0, 10.0, 60.0) and not learned(34.9, 10.0, 60.0)
