"""The micro world: deterministic rendering, the 20 personal concepts, and the shipped models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cns_lightning.microworld import concepts as C
from cns_lightning.microworld import world as W
from cns_lightning.microworld.assets import CLIP_DIR, PIPELINE_DIR, ROOT
from cns_lightning.microworld.metrics import pairwise_accuracy, pixel_values
from cns_lightning.tokenizer import clip_tokenizer

# --------------------------------------------------------------------------------------------- world


def test_rendering_is_deterministic_and_64px():
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(10):
        sa, sb = W.sample_scene(rng_a), W.sample_scene(rng_b)
        assert sa == sb
        a, b = np.asarray(sa.render()), np.asarray(sb.render())
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b)
    s = W.Scene((W.Obj("star", "red", "striped", "large", "left"),), "sand", "outline", seed=1)
    assert s.caption() == "a large red striped star on the left, on a sand background, in outline style"
    assert not np.array_equal(np.asarray(s.render()), np.asarray(W.Scene(s.objects, "sand", "outline", seed=2).render()))


def test_every_attribute_value_renders_differently():
    base = W.Scene((W.Obj("circle", "red", "solid", "large", "center"),), "white", "none", seed=0)
    for attr in W.ATTRIBUTES:
        imgs = [np.asarray(W.with_attribute(base, attr, v).render()).astype(int) for v in W.attribute_values(attr)]
        for i in range(len(imgs)):
            for j in range(i + 1, len(imgs)):
                assert np.abs(imgs[i] - imgs[j]).mean() > 1.0, (attr, i, j)


def test_heldout_pairs_split():
    rng = np.random.default_rng(0)
    for _ in range(300):
        s = W.sample_scene(rng, "train")
        assert all((o.colour, o.noun) not in W.HELDOUT_PAIRS for o in s.objects)
    for s in W.heldout_scenes(50):
        assert (s.objects[0].colour, s.objects[0].noun) in W.HELDOUT_PAIRS


def test_vocabulary_is_plain_clip_words():
    tok = clip_tokenizer()
    words = list(W.COLOURS) + list(W.NOUNS) + list(W.PATTERNS) + list(W.BACKGROUNDS) + list(W.STYLES[1:])
    unk = tok.convert_tokens_to_ids(tok.unk_token)
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        assert ids and unk not in ids and "".join(tok.convert_ids_to_tokens(ids)) == w + "</w>"


# --------------------------------------------------------------------------------------------- concepts


def test_twenty_concepts_with_the_paper_mix():
    assert len(C.CONCEPTS) == 20 and C.seq20 == list(C.CONCEPTS)
    cats = [c.category for c in C.CONCEPTS.values()]
    assert {k: cats.count(k) for k in C.CATEGORIES} == {"live_subject": 8, "object": 6, "style": 3, "scene": 3}
    assert len(C.seq7) == 7 and {C.CONCEPTS[n].category for n in C.seq7} == set(C.CATEGORIES)
    for c in C.CONCEPTS.values():
        assert 4 <= c.n_images <= 6
        caps = c.captions()
        assert len(caps) == c.n_images and all(cap.count("{token}") == 1 for cap in caps)
        if c.category in ("live_subject", "object"):
            assert c.class_name in W.CLASS_NOUNS and all(f"{{token}} {c.class_name}" in cap for cap in caps)
        assert c.eval_prompts and all("{token}" in p and "{class}" in p for p in c.eval_prompts)
        # the class prompt is a valid world caption
        assert "{token}" not in C.class_prompt(caps[0]) and "  " not in C.class_prompt(caps[0])


def test_concept_glyphs_are_not_world_objects():
    """A personal subject differs from its generic class glyph in every world colour."""
    for name in ("dog_patch", "cup_heart", "fish_clown"):
        c = C.CONCEPTS[name]
        mine = np.asarray(C.render(W.Scene((W.Obj(c.class_name, glyph=name),), "white", seed=0))).astype(int)
        for colour in W.COLOURS:
            generic = np.asarray(W.Scene((W.Obj(c.class_name, colour),), "white", seed=0).render()).astype(int)
            assert np.abs(mine - generic).mean() > 3.0


def test_materialize_is_deterministic_idempotent_and_atomic(tmp_path):
    for name in ("cat_tuxedo", "style_neon", "scene_island"):
        a = C.materialize(name, tmp_path / "a")
        b = C.materialize(name, tmp_path / "b")
        assert a == tmp_path / "a" / name
        lines = [json.loads(x) for x in (a / "metadata.jsonl").read_text().splitlines()]
        assert len(lines) == C.CONCEPTS[name].n_images
        assert [x["file_name"] for x in lines] == [f"{i:02d}.png" for i in range(len(lines))]
        assert all("{token}" in x["text"] for x in lines)
        for x in lines:
            assert (a / x["file_name"]).read_bytes() == (b / x["file_name"]).read_bytes()
        mtime = (a / "00.png").stat().st_mtime_ns
        assert C.materialize(name, tmp_path / "a") == a and (a / "00.png").stat().st_mtime_ns == mtime
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp folders left
    with pytest.raises(KeyError, match="unknown micro concept"):
        C.materialize("nope", tmp_path)


def test_prompt_sets():
    cal = C.calibration_prompts()
    assert len(cal) == 20 == len(set(cal))
    assert not any(noun in p.split() for p in cal for noun in W.CLASS_NOUNS)
    zs = C.zero_shot_scenes()
    assert all((s.objects[0].colour, s.objects[0].noun) in W.HELDOUT_PAIRS for s in zs)
    assert C.zero_shot_prompts() == [s.caption() for s in zs]
    multi = C.multi_concept_prompts(C.seq7)
    assert multi and all(len(m.concepts) == 2 for m in multi)
    tokens = {n: f"<new{i}>" for i, n in enumerate(C.seq7)}
    for m in multi:
        text = m.render(tokens)
        assert all(tokens[c] in text for c in m.concepts) and "{" not in text


# --------------------------------------------------------------------------------------------- shipped models


def test_shipped_assets_fit_the_budget():
    files = [p for p in ROOT.rglob("*") if p.is_file()]
    assert files
    assert max(p.stat().st_size for p in files) <= 16 * 10**6
    assert sum(p.stat().st_size for p in files) <= 80 * 10**6  # issue 14: at most 16 MB a file, 80 MB in all


def test_shipped_pipeline_loads_with_plain_diffusers_and_generates():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(PIPELINE_DIR))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float32
    assert any(n.endswith("attn2.to_k") for n, _ in pipe.unet.named_modules())
    prompt = "a large red circle in the center, on a white background"
    assert pipe.tokenizer(prompt).input_ids == clip_tokenizer()(prompt).input_ids
    out = pipe(prompt, num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="np")
    img = out.images[0]
    assert img.shape == (64, 64, 3) and np.isfinite(img).all() and img.std() > 0.02


def test_shipped_clip_ranks_true_captions_above_wrong_attributes():
    from transformers import CLIPModel, CLIPProcessor, CLIPTextModel

    clip = CLIPModel.from_pretrained(str(CLIP_DIR)).eval()
    proc = CLIPProcessor.from_pretrained(str(CLIP_DIR))
    scenes = W.heldout_scenes(64, seed=4242)
    images = [s.render() for s in scenes]
    ours = pixel_values(images[:4])
    theirs = proc(images=images[:4], return_tensors="pt").pixel_values
    assert torch.allclose(ours, theirs, atol=1e-5)
    acc = pairwise_accuracy(clip, proc.tokenizer, images, scenes, np.random.default_rng(0))
    assert acc >= 0.8, f"held-out pairwise caption accuracy {acc:.2f} (chance 0.5)"
    # the pipeline's text encoder is the CLIP's text tower
    te = CLIPTextModel.from_pretrained(str(PIPELINE_DIR / "text_encoder"))
    ids = proc.tokenizer(["a small blue dog on the left, on a grass background"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(te(ids).last_hidden_state, clip.text_model(ids).last_hidden_state, atol=1e-5)


def test_every_world_caption_uses_only_caption_words():
    """CAPTION_WORDS is the whole caption grammar: sampled scenes and every micro concept's
    captions and prompts have no word outside it."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        assert W.words_outside_the_world(W.sample_scene(rng).caption()) == []
    for mc in C.CONCEPTS.values():
        texts = [*mc.captions(), *mc.eval_prompts]
        assert all(W.words_outside_the_world(t.replace("{class}", mc.class_name)) == [] for t in texts), mc.name


def test_own_concepts_on_the_micro_model_warn_on_words_it_cannot_draw(tmp_path):
    """Through the loop's input checks (model=micro): an own concept captioned 'photo of a ...
    teddy bear' warns, naming the words and where they are; a world-worded one and the micro
    world's own concepts do not; another model does not check."""
    import warnings

    from conftest import compose_cfg, concepts_override, make_concept_folder
    import cns_lightning.__main__  # noqa: F401  (registers the ${micro_asset:...} resolver)
    from cns_lightning import continual

    teddy = make_concept_folder(tmp_path / "data" / "teddy", n=2, captions=["photo of a {token} teddy bear on the sofa"])
    dog = make_concept_folder(tmp_path / "data" / "dog", n=2, captions=["a large {token} dog in the center, on a white background"])
    own = concepts_override([teddy, dog], classes=("teddy bear", "dog"))[len("data.concepts=["):-1]
    override = f"data.concepts=[{own},{{name:cat_tabby,source:microworld}}]"
    # the dog's default evaluation prompts (DreamBooth's: jungle, chef outfit ...) are not world words either
    cfg = compose_cfg(tmp_path, ["+experiment=seq7", override, "eval.enabled=false"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        continual.check_inputs(cfg)
    msgs = [str(w.message) for w in caught if "micro world cannot draw" in str(w.message)]
    assert len(msgs) == 2, msgs
    assert msgs[0].startswith("data.concepts[0] ('teddy') on model=micro: the micro world cannot draw 'photo', 'of', 'teddy', 'bear', 'sofa'")
    assert "(first in the caption of 00.png: 'photo of a <new1> teddy bear on the sofa')" in msgs[0]
    assert msgs[1].startswith("data.concepts[1] ('dog') on model=micro: the micro world cannot draw 'jungle'")
    assert "first in an evaluation prompt: 'a dog in the jungle'" in msgs[1]
    assert "caption_template: 'a large {token} {class} in the center, on a white background'" in msgs[0]
    cfg = compose_cfg(tmp_path / "tiny", [override])  # model=tiny: no check
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        continual.check_inputs(cfg)
    assert not [w for w in caught if "micro world cannot draw" in str(w.message)]
