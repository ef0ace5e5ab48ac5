"""cns_lightning.tokens: the new tokens and what their embeddings start from (data.token_init)."""

from __future__ import annotations

import pytest
import torch

from conftest import FAST, concepts_override, make_concept_folder, run_cli
from cns_lightning.concepts import Concept
from cns_lightning.models import build_random_pipeline
from cns_lightning.tokens import CUSTOM_DIFFUSION_WORDS, TOKEN_INITS, add_concept_tokens


def _concepts(n: int, **kw) -> list[Concept]:
    classes = ["teddy bear", "mug", "vase", "dog"]
    return [Concept(name=f"c{i}", token=f"<new{i + 1}>", class_name=classes[i % 4], **kw) for i in range(n)]


def _word_row(pipe, word: str) -> torch.Tensor:
    ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
    return pipe.text_encoder.get_input_embeddings().weight[ids].mean(0)


def _added(init: str, concepts: list[Concept], seed: int = 0):
    pipe = build_random_pipeline("tiny")
    ids = add_concept_tokens(pipe.tokenizer, pipe.text_encoder, concepts, init=init, seed=seed)
    emb = pipe.text_encoder.get_input_embeddings().weight.detach()
    return pipe, {c.name: emb[ids[c.name]].clone() for c in concepts}


def test_class_noun_starts_each_token_at_its_class_words_mean_embedding():
    concepts = _concepts(2)
    pipe, rows = _added("class_noun", concepts)
    for c in concepts:  # "teddy bear" is two tokens: their mean
        torch.testing.assert_close(rows[c.name], _word_row(pipe, c.class_name), rtol=0, atol=0)


def test_rare_word_is_custom_diffusions_initializer_tokens_in_order_then_cycled():
    concepts = _concepts(4)
    pipe, rows = _added("rare_word", concepts)
    assert CUSTOM_DIFFUSION_WORDS == ("ktn", "pll", "ucd")  # diffusers train_custom_diffusion.py default
    entries = pipe.tokenizer.convert_tokens_to_ids(list(CUSTOM_DIFFUSION_WORDS))
    assert entries[0] == 42170  # the id Custom Diffusion's own code names for "ktn"
    emb = pipe.text_encoder.get_input_embeddings().weight
    for i, c in enumerate(concepts):
        torch.testing.assert_close(rows[c.name], emb[entries[i % 3]], rtol=0, atol=0)
    assert not torch.equal(rows["c0"], rows["c1"])


def test_random_rows_follow_the_vocabulary_statistics_and_the_seed():
    concepts = _concepts(3)
    pipe, rows = _added("random", concepts, seed=0)
    _, again = _added("random", concepts, seed=0)
    _, other = _added("random", concepts, seed=1)
    for c in concepts:
        assert torch.equal(rows[c.name], again[c.name])  # loop and restore build the same row
        assert not torch.equal(rows[c.name], other[c.name])
    assert not torch.equal(rows["c0"], rows["c1"])
    vocab = pipe.text_encoder.get_input_embeddings().weight.detach()[: len(pipe.tokenizer) - 3]
    for c in concepts:  # not a word's row: far from every row of the vocabulary
        assert torch.cdist(rows[c.name][None], vocab).min() > 0
    z = (torch.stack(list(rows.values())) - vocab.mean(0)) / vocab.std(0)
    assert 0.7 < z.std().item() < 1.3 and abs(z.mean().item()) < 0.2


@pytest.mark.parametrize("init", TOKEN_INITS)
def test_a_concepts_own_init_word_wins(init):
    concepts = _concepts(2)
    concepts[1].init_word = "car"
    pipe, rows = _added(init, concepts)
    torch.testing.assert_close(rows["c1"], _word_row(pipe, "car"), rtol=0, atol=0)


def test_a_bad_token_init_fails_through_the_cli_before_anything_is_written(tmp_path, env):
    data = make_concept_folder(tmp_path / "data" / "teddy", n=2)
    proc = run_cli([concepts_override([data]), *FAST, "data.token_init=rnd"], env, check=False)
    assert proc.returncode == 1
    assert "data.token_init='rnd': expected one of class_noun, rare_word, random" in proc.stderr
    run = tmp_path / "out" / "default" / "cns" / "seed0"  # (Hydra has made the folder and its .hydra/)
    assert not (run / "run_identity.json").exists() and not (run / "stages").exists()
