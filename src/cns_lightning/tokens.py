"""Modifier tokens: one new token ``<new_m>`` per concept, added to the tokenizer and text encoder."""

from __future__ import annotations

import re

import torch

from .concepts import Concept, ConceptError


def add_concept_tokens(tokenizer, text_encoder, concepts: list[Concept]) -> dict[str, int]:
    """Add every concept's token (in sequence order) and initialise its embedding.

    The embedding starts as the mean embedding of the tokens of ``init_word`` (default: the class
    noun), as Custom Diffusion initialises its modifier token from a word. Returns name -> token id.
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
    text_encoder.resize_token_embeddings(len(tokenizer))
    emb = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for c in concepts:
            init = tokenizer(c.init_word or c.class_name, add_special_tokens=False).input_ids
            emb[ids[c.name]] = emb[init].mean(0) if init else emb[: ids[c.name]].mean(0)
    return ids


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
