"""Modifier tokens: one new token ``<new_m>`` per concept, added to the tokenizer and text encoder."""

from __future__ import annotations

import torch

from .concepts import Concept, ConceptError


def add_concept_tokens(tokenizer, text_encoder, concepts: list[Concept]) -> dict[str, int]:
    """Add every concept's token (in sequence order) and initialise its embedding.

    The embedding starts as the mean embedding of the tokens of ``init_word`` (default: the class
    noun), as Custom Diffusion initialises its modifier token from a word. Returns name -> token id.
    """
    ids = {}
    for i, c in enumerate(concepts):
        if c.token in tokenizer.get_vocab():
            raise ConceptError(
                f"data.concepts[{i}].token={c.token!r} is already in the tokenizer's vocabulary; pick a new "
                "string such as '<new1>' (the token must be new so that only this concept owns it)"
            )
        if len(tokenizer.tokenize(c.token)) == 0:
            raise ConceptError(f"data.concepts[{i}].token={c.token!r} is empty; use a string such as '<new1>'")
        tokenizer.add_tokens([c.token])
        ids[c.name] = tokenizer.convert_tokens_to_ids(c.token)
    text_encoder.resize_token_embeddings(len(tokenizer))
    emb = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for c in concepts:
            init = tokenizer(c.init_word or c.class_name, add_special_tokens=False).input_ids
            emb[ids[c.name]] = emb[init].mean(0) if init else emb[: ids[c.name]].mean(0)
    return ids
