"""Hypothesis fuzzing of captions and prompts through the caption -> token -> text-encoder path.

Any unicode (controls, combining marks, emoji, right-to-left, U+2028), empty strings and texts far
beyond CLIP's 77 tokens go through ``Concept.captions`` (caption files on disk), ``Concept.fill``
(prompt templates), ``data.tokenize`` and ``selection.encode_norms``. Nothing may crash; every
row is exactly 77 ids, starts with the start token, holds one end token (at the end when the text
was cut), and the concept's token is kept whenever it falls inside the first 75 text tokens.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cns_lightning.concepts import Concept
from cns_lightning.data import tokenize
from cns_lightning.images import ImageInputError
from cns_lightning.models import build_random_pipeline
from cns_lightning.selection import TOKEN_RULES, encode_norms
from cns_lightning.tokens import add_concept_tokens
from conftest import make_concept_folder

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=600)  # any valid unicode
WORDS = st.lists(st.sampled_from(["a", "photo", "of", "the", "dog", "🙂", "très", "東京", "\u2028", "{class}", "{token}", "  "]), max_size=120).map(" ".join)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pipe():
    p = build_random_pipeline("tiny")
    concept = Concept(name="teddy", token="<new1>", class_name="teddy bear", path=Path("."))
    p.token_id = add_concept_tokens(p.tokenizer, p.text_encoder, [concept])["teddy"]
    yield p


def check_rows(pipe, texts: list[str], ids: torch.Tensor) -> None:
    tok = pipe.tokenizer
    assert ids.shape == (len(texts), 77) and ids.dtype == torch.long
    for text, row in zip(texts, ids.tolist()):
        full = tok(text).input_ids  # untruncated
        assert row[0] == tok.bos_token_id
        if len(full) > 77:  # cut: the first 75 text tokens, then the end token
            assert row == full[:76] + [tok.eos_token_id]
        else:
            assert row[: len(full)] == full and full[-1] == tok.eos_token_id
            assert all(t == tok.pad_token_id for t in row[len(full) :])
        kept = pipe.token_id in full[:76]
        assert (pipe.token_id in row) == kept


@FUZZ
@given(captions=st.lists(st.one_of(TEXT, WORDS), min_size=2, max_size=2), class_name=st.one_of(st.sampled_from(["teddy bear", "dog", "c++", "(x)"]), st.text(min_size=1, max_size=20)))
def test_caption_files_through_tokenizer_and_text_encoder(pipe, captions, class_name):
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_concept_folder(Path(tmp) / "c", n=2, size=8)
        for i, text in enumerate(captions):
            (folder / f"{i:02d}.txt").write_text(text, encoding="utf-8")
        concept = Concept(name="teddy", token="<new1>", class_name=class_name, path=folder)
        if any(not t.strip() for t in captions):
            with pytest.raises(ImageInputError, match="caption is empty"):
                concept.captions()
            return
        filled = concept.captions()
    assert len(filled) == 2
    for raw, text in zip(captions, filled):
        assert "<new1>" in text, (raw, text)  # the token is always written in
    ids = tokenize(pipe.tokenizer, filled)
    check_rows(pipe, filled, ids)
    with torch.no_grad():
        norms = encode_norms(pipe.text_encoder, pipe.tokenizer, filled, "no_bos")
    assert len(norms) == 2 and all(n.shape == (32,) and torch.isfinite(n).all() for n in norms)


@FUZZ
@given(prompts=st.lists(st.one_of(TEXT, WORDS, st.just("")), min_size=1, max_size=4), rule=st.sampled_from(TOKEN_RULES))
def test_prompts_any_text_any_token_rule(pipe, prompts, rule):
    concept = Concept(name="teddy", token="<new1>", class_name="teddy bear", path=Path("."))
    texts = [concept.fill(p) for p in prompts] + [concept.fill(p, with_token=False) for p in prompts]
    for raw, text in zip(prompts, texts):
        assert "{token}" not in text and "{class}" not in text
        if "{token}" in raw:
            assert "<new1>" in text
    check_rows(pipe, texts, tokenize(pipe.tokenizer, texts))
    with torch.no_grad():
        norms = encode_norms(pipe.text_encoder, pipe.tokenizer, texts, rule)
    assert len(norms) == len(texts) and all(n.shape == (32,) and torch.isfinite(n).all() for n in norms)
