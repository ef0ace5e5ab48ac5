"""methods/kv_store.py: the compact stage format of the masked methods (masks, fp16 K/V deltas)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cns_lightning.checkpoint import CheckpointError
from cns_lightning.methods.kv_store import apply_kv, decode_mask, encode_mask, kv_file, mask_file, read_masks


@pytest.mark.parametrize("shape", [(7, 13), (1,), (9,), (3, 5, 7), (0,), (320, 768)])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_masks_round_trip(shape, density):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < density
    tensors, meta = mask_file({"k": mask})
    assert meta["format"] == "gaps-zlib" and tensors["k"].dtype == torch.uint8
    assert read_masks(tensors, meta)["k"].equal(mask)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=200), st.integers(1, 4))
def test_mask_codec_fuzz(bits, rows):
    mask = torch.tensor(bits * rows).reshape(rows, len(bits))
    assert decode_mask(encode_mask(mask), tuple(mask.shape)).equal(mask)


def test_bit_packed_masks_of_older_folders_still_load():
    mask = torch.rand(7, 13, generator=torch.Generator().manual_seed(2)) > 0.3
    packed = torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))  # 8 entries per byte, MSB first
    assert read_masks({"k": packed}, {"k": "7x13"})["k"].equal(mask)
    with pytest.raises(CheckpointError, match="cannot hold a mask of shape"):
        read_masks({"k": packed}, {"k": "9x13"})
    with pytest.raises(CheckpointError, match="points past its shape"):
        decode_mask(encode_mask(torch.ones(20, dtype=torch.bool)), (10,))


def test_fp16_deltas_round_the_live_weights_to_what_loads_back():
    g = torch.Generator().manual_seed(0)
    w0 = {"a": torch.randn(6, 5, generator=g), "b": torch.randn(4, 3, generator=g)}
    live = {n: torch.nn.Parameter(w + 0.01 * torch.randn(w.shape, generator=g)) for n, w in w0.items()}
    masks = [{n: torch.rand(w.shape, generator=g) < 0.5 for n, w in w0.items()} for _ in range(2)]
    union = {n: masks[0][n] | masks[1][n] for n in w0}
    outside = {n: live[n].detach()[~union[n]].clone() for n in w0}
    tensors, meta = kv_file(live, w0, masks)  # rounds ``live`` in place
    assert meta == {"format": "delta-fp16"} and all(t.dtype == torch.float16 for t in tensors.values())
    for n in w0:
        assert tensors[n].numel() == int(union[n].sum())
        assert torch.equal(live[n].detach()[~union[n]], outside[n]), "an entry outside the union was touched"
    fresh = {n: torch.nn.Parameter(w.clone()) for n, w in w0.items()}
    apply_kv(fresh, w0, masks, tensors, deltas=True)
    for n in w0:
        assert torch.equal(fresh[n].detach()[union[n]], live[n].detach()[union[n]])
        assert torch.equal(fresh[n].detach()[~union[n]], w0[n][~union[n]])
