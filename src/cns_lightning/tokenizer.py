"""The real CLIP tokenizer (the one SD-1.5 ships), built offline.

No model hub is needed: ``assets/clip_tokenizer/bpe_simple_vocab_16e6.txt.gz`` is OpenAI's BPE
file as shipped by open-clip-torch (MIT, see ``LICENSE-open_clip`` beside it). OpenAI's recipe
turns it into ``vocab.json`` / ``merges.txt`` identical to SD-1.5's tokenizer (49,408 tokens):

    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab  = 256 byte chars + the same with ``</w>`` + joined merges + the two special tokens

The files are written once into a cache folder and loaded with ``CLIPTokenizer``. (Note: in
transformers 5, ``CLIPTokenizerFast(vocab_file=..., merges_file=...)`` silently builds a broken
tokenizer; the slow tokenizer with explicit files is exact.)
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

ASSET = Path(__file__).parent / "assets" / "clip_tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_vocab_and_merges(bpe_gz: Path = ASSET) -> tuple[dict[str, int], list[str]]:
    """Return (vocab, merges) exactly as OpenAI's SimpleTokenizer builds them."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    merge_pairs = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in merge_pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return {tok: i for i, tok in enumerate(vocab)}, merges


def tokenizer_files(cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write vocab.json/merges.txt once (atomically) and return their paths."""
    root = Path(cache_dir or os.environ.get("CNS_CACHE", Path.home() / ".cache" / "cns_lightning")) / "clip_tokenizer"
    vocab_path, merges_path = root / "vocab.json", root / "merges.txt"
    if vocab_path.exists() and merges_path.exists():
        return vocab_path, merges_path
    root.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    from .checkpoint import atomic_write_bytes

    for path, text in ((vocab_path, json.dumps(vocab)), (merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n")):
        atomic_write_bytes(path, text.encode("utf-8"))
    return vocab_path, merges_path


@lru_cache(maxsize=4)
def _cached_tokenizer(cache_dir: str | None) -> CLIPTokenizer:
    vocab_path, merges_path = tokenizer_files(cache_dir)
    return CLIPTokenizer(
        str(vocab_path),
        str(merges_path),
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )


def clip_tokenizer(cache_dir: str | None = None) -> CLIPTokenizer:
    """A fresh copy of SD-1.5's CLIP tokenizer (a copy: callers add modifier tokens to it)."""
    import copy

    return copy.deepcopy(_cached_tokenizer(cache_dir))
