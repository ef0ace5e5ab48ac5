"""The micro identity model (microworld/identity.py): procedural identities and their views, the
resumable contrastive training, the saved HF folder and the per-concept AUC."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from cns_lightning.microworld.trainstate import load_training_state
from cns_lightning.evaluation.metrics import load_dino
from cns_lightning.microworld import concepts as C
from cns_lightning.microworld import identity as I
from cns_lightning.microworld import world as W

TINY = ["--hidden", "32", "--layers", "1", "--heads", "2"]
TRAIN = ["train", "--batch", "8", "--workers", "0", "--device", "cpu", "--save-every", "2", *TINY]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 2 steps on CPU (its folder)."""
    out = tmp_path_factory.mktemp("identity") / "run"
    assert I.main(TRAIN + ["--out", str(out), "--steps", "2"]) == 0
    return out


def _show(ident: I.Identity, **obj) -> np.ndarray:
    """``ident`` (a glyph) as a large dog in the centre of one fixed scene."""
    scene = W.Scene((W.Obj(ident.noun, glyph=ident.key, **obj),), background="white", seed=1)
    return np.asarray(I.render(scene, (ident,)), dtype=int)


def test_identities_are_deterministic_and_never_the_personal_concepts(monkeypatch):
    a, b = I.sample_identities(np.random.default_rng(7), 40), I.sample_identities(np.random.default_rng(7), 40)
    assert a == b and {i.kind for i in a} == set(I.KINDS)
    personal = set(C.GLYPHS) | set(C.STYLES) | set(C.BACKGROUNDS)
    assert not personal & {i.key for i in a}
    imgs, labels = I.render_batch(3, 5, 32, 2)
    assert imgs.shape == (32, 64, 64, 3) and imgs.dtype == np.uint8
    assert np.array_equal(labels[::2], labels[1::2])  # two views per identity
    assert not np.array_equal(imgs, I.render_batch(3, 6, 32, 2)[0])
    # Training data never reads the personal concepts: with them gone, the batch is the same.
    for name in ("GLYPHS", "STYLES", "BACKGROUNDS"):
        monkeypatch.setattr(C, name, {})
    I.extras.cache_clear()
    again, labels_again = I.render_batch(3, 5, 32, 2)
    assert np.array_equal(imgs, again) and np.array_equal(labels, labels_again)


def test_identities_of_one_class_differ_and_views_differ_in_layout():
    rng = np.random.default_rng(0)
    g1, g2 = I.random_glyph(rng, "dog"), I.random_glyph(rng, "dog")
    sib = I.sibling(g1, rng)
    assert len({g1, g2, sib}) == 3 and g1.noun == g2.noun == sib.noun == "dog"
    a, b, s = _show(g1), _show(g2), _show(sib)
    assert np.abs(a - b).mean() > 1.0
    assert (np.abs(a - s).sum(-1) > 30).sum() >= 3  # the sibling differs in one visible part
    # plain world objects: same noun, another colour
    red, blue = I.Identity("plain", "dog", ("red", "solid")), I.Identity("plain", "dog", ("blue", "solid"))
    scene = lambda i: W.Scene((W.Obj("dog", *i.params),), "white", seed=1)
    assert np.abs(np.asarray(I.render(scene(red)), int) - np.asarray(I.render(scene(blue)), int)).mean() > 1.0
    for ident in (g1, red, I.random_style(rng), I.random_scene(rng)):
        (s1, _), (s2, _) = I.view_scene(ident, np.random.default_rng(1)), I.view_scene(ident, np.random.default_rng(2))
        assert s1 != s2
        if ident.kind in ("glyph", "plain"):  # the identity itself is in both
            assert any(o.noun == ident.noun for o in s1.objects) and any(o.noun == ident.noun for o in s2.objects)
        v1, v2 = I.identity_views(ident, 2, np.random.default_rng(3))
        assert np.abs(np.asarray(v1, int) - np.asarray(v2, int)).mean() > 1.0
    # a style / scene identity is not the world's: the same content renders differently
    content = W.sample_scene(np.random.default_rng(4), "train", styled=0.0)
    st, sc = I.random_style(rng), I.random_scene(rng)
    plain = np.asarray(I.render(content), int)
    styled = np.asarray(I.render(replace(content, style=st.key), (st,)), int)
    assert np.abs(styled - plain).mean() > 1.0
    sib = I.style_sibling(st, rng)  # one parameter or one operation differs: other pixels
    assert sib != st and np.abs(np.asarray(I.render(replace(content, style=sib.key), (sib,)), int) - styled).mean() > 0.5
    assert np.abs(np.asarray(I.render(replace(content, background=sc.key), (sc,)), int) - plain).mean() > 1.0


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = I.build_model(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x, y = (torch.from_numpy(t) for t in I.render_batch(0, 0, 16, 2))
    losses = [I.train_step(model, opt, x, y, 0.1) for _ in range(25)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_supcon_is_infonce_for_two_views():
    z = torch.nn.functional.normalize(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = (z @ z.T / 0.1).fill_diagonal_(float("-inf"))
    partner = torch.tensor([1, 0, 3, 2, 5, 4])
    assert I.supcon_loss(z, labels, 0.1).item() == pytest.approx(torch.nn.functional.cross_entropy(logits, partner).item(), rel=1e-5)


def test_a_resumed_run_continues_from_its_checkpoint(tmp_path, capsys):
    assert I.main(TRAIN + ["--out", str(tmp_path / "straight"), "--steps", "4"]) == 0
    split = tmp_path / "split"
    assert I.main(TRAIN + ["--out", str(split), "--steps", "4", "--max-seconds", "0"]) == 0  # time cap: one step
    assert load_training_state(split / "checkpoint.pt")["step"] == 1
    assert (split / "model" / "config.json").is_file() and json.loads((split / "train.json").read_text())["stopped_by"] == "time cap"
    capsys.readouterr()
    assert I.main(TRAIN + ["--out", str(split), "--steps", "4"]) == 0
    assert "resumed from step 1" in capsys.readouterr().out
    info = json.loads((split / "train.json").read_text())
    assert (info["step"], info["steps_this_call"], info["stopped_by"]) == (4, 3, "steps")
    # same data stream, optimizer state and schedule: the split run ends where the straight one does
    a = load_training_state(tmp_path / "straight" / "checkpoint.pt")["model"]
    b = load_training_state(split / "checkpoint.pt")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not list(split.glob(".*"))  # no temporary files left


def test_saved_folder_loads_with_automodel_and_load_dino(trained, tmp_path):
    from transformers import AutoModel, ViTModel

    folder = trained / "model"
    model = AutoModel.from_pretrained(folder).eval()
    assert isinstance(model, ViTModel) and model.dtype == torch.float32 and model.config.image_size == 64
    dino = load_dino(folder)
    assert (dino.crop, dino.resize, dino.mean, dino.std) == (64, 64, I.MEAN, I.STD)
    imgs, _ = I.render_batch(9, 0, 6, 2)
    from PIL import Image

    e = dino.image_embeddings([Image.fromarray(a) for a in imgs])
    assert e.shape == (6, 32) and torch.allclose(e.norm(dim=1), torch.ones(6), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(e, I.embed(model, torch.from_numpy(imgs)), atol=1e-5)  # training == scoring preprocessing
    # the full-size model: 2.7 M parameters, <= 16 MB on disk
    I.save_model(I.build_model(), tmp_path / "full")
    size = sum(f.stat().st_size for f in (tmp_path / "full").iterdir())
    assert 2.5e6 < sum(p.numel() for p in AutoModel.from_pretrained(tmp_path / "full").parameters()) < 3.0e6
    assert size <= 16e6


def test_auc_and_concept_eval_sets(trained):
    assert I.auc([2, 3], [0, 1]) == 1.0 and I.auc([0], [1]) == 0.0 and I.auc([1, 1], [1]) == 0.5
    sets = I.concept_eval_sets("dog_patch", 4, 8)
    assert [len(sets[k]) for k in ("references", "positives", "negatives")] == [5, 4, 8]
    again = I.concept_eval_sets("dog_patch", 4, 8)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(sets["negatives"], again["negatives"]))
    # raw pixels as an embedding: a scene concept's own background must rank its renders first
    pixels = lambda ims: torch.nn.functional.normalize(torch.stack([torch.from_numpy(np.asarray(im, np.float32)).flatten() for im in ims]) - 128, dim=-1)
    assert I.concept_auc(I.embed_sets(pixels, I.concept_eval_sets("scene_checkroom", 6, 12))) > 0.9
    res = I.evaluate(trained, 4, 8, with_clip=False, names=["dog_patch", "style_neon", "scene_island"])
    assert set(res) == {"dog_patch", "style_neon", "scene_island"}
    for name, r in res.items():
        assert 0.0 <= r["auc"] <= 1.0 and -1.0 <= r["self_similarity"] <= 1.0
        assert r["category"] == C.CONCEPTS[name].category
    assert I.reference_self_similarity(trained, "dog_patch") == pytest.approx(res["dog_patch"]["self_similarity"], abs=1e-6)
    assert "dog_patch" in I.format_table(res)


def test_eval_of_a_missing_model_names_the_folder(tmp_path, capsys):
    assert I.main(["eval", "--model", str(tmp_path / "nothing"), "--no-clip"]) == 2
    assert "nothing" in capsys.readouterr().err
