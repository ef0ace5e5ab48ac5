"""The offline CLIP tokenizer equals SD-1.5's (vocabulary size and known token ids)."""

from cns_lightning.tokenizer import build_vocab_and_merges, clip_tokenizer


def test_vocab_and_known_ids():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    vocab, merges = build_vocab_and_merges()
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert len(merges) == 48894


def test_copies_are_independent():
    a, b = clip_tokenizer(), clip_tokenizer()
    a.add_tokens(["<new1>"])
    assert "<new1>" not in b.get_vocab()
