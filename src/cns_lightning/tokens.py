"""Modifier tokens: one new token ``<new_m>`` per concept, added to the tokenizer and text encoder."""

from __future__ import annotations

import re

import torch

from .concepts import Concept, ConceptError

# data.token_init: what a new token's embedding starts from (initial_embedding)
TOKEN_INITS = ("class_noun", "rare_word", "random")
CUSTOM_DIFFUSION_WORDS = ("ktn", "pll", "ucd")  # diffusers train_custom_diffusion.py --initializer_token default


def token_init(cfg) -> str:
    """A run config's ``data.token_init``; a run folder written before the knob existed used ``class_noun``."""
    data = cfg.get("data") or {}
    return str(data.get("token_init", "class_noun"))


def add_concept_tokens(tokenizer, text_encoder, concepts: list[Concept], init: str = "class_noun", seed: int = 0) -> dict[str, int]:
    """Add every concept's token (in sequence order) and initialise its embedding with
    :func:`initial_embedding` (``init``: ``data.token_init``). Returns name -> token id.
    Default tokens (``<new{i}>``, no ``token`` in the entry) are numbered after the ``<newN>``
    tokens the base model already has (a model exported by ``cns_lightning.export``).
    """
    ids = {}
    vocab = tokenizer.get_vocab()
    known = max((int(m.group(1)) for t in vocab if (m := re.fullmatch(r"<new(\d+)>(</w>)?", t))), default=0)
    for i, c in enumerate(concepts):
        if known and not c.token_given:
            c.token = f"<new{known + i + 1}>"
    for i, c in enumerate(concepts):
        where = f"data.concepts[{i}].token={c.token!r}"
        if not c.token.strip() or len(tokenizer.tokenize(c.token)) == 0:
            raise ConceptError(f"{where} is empty; use a string such as '<new1>'")
        if any(ch.isspace() for ch in c.token):
            raise ConceptError(f"{where} holds whitespace; use one word such as '<new{i + 1}>'")
        pieces = tokenizer.tokenize(c.token)
        if c.token in vocab or (len(pieces) == 1 and pieces[0] in vocab):
            raise ConceptError(
                f"{where} is already in the tokenizer's vocabulary (as {pieces[0]!r}); pick a new "
                f"string such as '<new{i + 1}>' (the token must be new so that only this concept owns it)"
            )
        tokenizer.add_tokens([c.token])
        ids[c.name] = tokenizer.convert_tokens_to_ids(c.token)
    # every token must read back, in a caption, as its own id (tokens differing only in case do not)
    for i, c in enumerate(concepts):
        in_text = tokenizer(c.token, add_special_tokens=False).input_ids
        if in_text != [ids[c.name]]:
            same = [f"data.concepts[{j}].token={d.token!r}" for j, d in enumerate(concepts) if j != i and [ids[d.name]] == in_text]
            why = f"it reads as {same[0]} (the tokenizer ignores case)" if same else f"it reads as ids {in_text}"
            raise ConceptError(
                f"data.concepts[{i}].token={c.token!r}: in a caption the tokenizer does not read it as its own new token "
                f"({why}); give every concept its own token such as '<new{i + 1}>'"
            )
    if init not in TOKEN_INITS:
        raise ConceptError(f"data.token_init={init!r}: choose one of {', '.join(TOKEN_INITS)}")
    first_new = len(text_encoder.get_input_embeddings().weight)
    text_encoder.resize_token_embeddings(len(tokenizer))
    emb = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        vocab_rows = emb[:first_new]
        for m, c in enumerate(concepts):
            emb[ids[c.name]] = initial_embedding(tokenizer, vocab_rows, c, m, init, seed).to(emb.dtype)
    return ids


def initial_word(concept: Concept, index: int, init: str) -> str | None:
    """The word whose embedding a concept's new token starts from (None: ``random``).

    A concept's own ``init_word`` wins. Else ``class_noun``: its class noun (textual inversion's
    ``--initializer_token``, a coarse descriptor of the concept); ``rare_word``: the rare words of
    Custom Diffusion's ``--initializer_token`` default ``ktn+pll+ucd`` (diffusers
    ``train_custom_diffusion.py``, which looks each up as one vocabulary entry, id 42170 for "ktn";
    the Custom Diffusion paper initialises its modifier token "with a rarely occurring token
    embedding"), concept m taking word m (cycled after three).
    """
    if concept.init_word:
        return concept.init_word
    if init == "class_noun":
        return concept.class_name
    if init == "rare_word":
        return CUSTOM_DIFFUSION_WORDS[index % len(CUSTOM_DIFFUSION_WORDS)]
    return None


def initial_embedding(tokenizer, vocab_rows: torch.Tensor, concept: Concept, index: int, init: str, seed: int) -> torch.Tensor:
    """The first embedding of concept ``index``'s new token (``data.token_init``).

    From a word (:func:`initial_word`): the mean embedding of the word's tokens (one token for the
    usual class noun or rare word; the mean for a word the tokenizer splits). ``random``: a row
    drawn from N(mean, std) of the vocabulary's rows, per feature, seeded by ``seed`` and the
    concept's place (the same row in the loop and in ``restore``), as a new row of
    ``resize_token_embeddings`` is a random normal row.
    """
    word = initial_word(concept, index, init)
    if init == "rare_word" and not concept.init_word:
        # a vocabulary entry, as diffusers' script reads it (tokenizer.encode([word]) looks the
        # string up as one token): "ktn" is entry 42170 of the CLIP vocabulary, not the word "ktn"
        return vocab_rows[tokenizer.convert_tokens_to_ids(word)]
    if word is not None:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise ConceptError(f"data.concepts[{index}] ({concept.name!r}): the token's initial word {word!r} has no tokens; "
                               "set init_word to a word of the vocabulary, or data.token_init=random")
        return vocab_rows[ids].mean(0)  # in the embedding's dtype, as before this knob existed
    rows = vocab_rows.detach().float()
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + index)
    noise = torch.randn(rows.shape[1], generator=g).to(rows.device)
    return rows.mean(0) + rows.std(0) * noise


def check_token_in_captions(tokenizer, concepts: list[Concept], ids: dict[str, int], cache_dir=None) -> None:
    """Raise ``ConceptError`` for a caption whose modifier token falls beyond CLIP's 77 positions
    (start token + 75 text tokens + end token): truncation would cut the token, and the image
    would train the other weights without it."""
    room = tokenizer.model_max_length - 2
    for i, c in enumerate(concepts):
        for image, caption in zip(c.image_paths(cache_dir), c.captions(cache_dir)):
            text_ids = tokenizer(caption, add_special_tokens=False).input_ids
            if ids[c.name] in text_ids[:room] or ids[c.name] not in text_ids:
                continue  # (bind_token puts the token into every caption)
            raise ConceptError(
                f"data.concepts[{i}] ({c.name!r}), the caption of {image}: {c.token!r} is text token "
                f"{text_ids.index(ids[c.name]) + 1} of {len(text_ids)}, past the {room} the text encoder reads "
                f"(77 positions with the start and end tokens), so it would be cut off. Fix: shorten that caption "
                f"or move {c.token!r} nearer its start."
            )
