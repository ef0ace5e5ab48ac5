"""Eq. 3-6 against direct computations on small tensors."""

import pytest
import torch

from cns_lightning.selection import (
    SelectionConfig,
    base_mask,
    caption_mask,
    concept_mask,
    feature_norms,
    general_mask,
    importance_scores,
    random_like_counts,
    select_concept_neurons,
    threshold_mask,
    token_positions,
)


def test_feature_norms_is_l2_over_tokens_per_feature():
    c = torch.randn(5, 3)
    direct = torch.tensor([sum(float(c[t, j]) ** 2 for t in range(5)) ** 0.5 for j in range(3)])
    assert torch.allclose(feature_norms(c), direct, atol=1e-6)


def test_eq3_scores_broadcast_norm_over_rows():
    w = torch.randn(4, 3)
    cn = torch.tensor([1.0, 2.0, 3.0])
    s = importance_scores(w, cn)
    for i in range(4):
        for j in range(3):
            assert s[i, j] == pytest.approx(abs(float(w[i, j])) * float(cn[j]))


def test_token_rules():
    ids = torch.tensor([49406, 320, 2368, 49407, 49407, 49407])
    assert token_positions(ids, 49407, "all").tolist() == [True] * 6
    assert token_positions(ids, 49407, "no_bos").tolist() == [False, True, True, True, True, True]
    assert token_positions(ids, 49407, "until_eos").tolist() == [True, True, True, True, False, False]
    assert token_positions(ids, 49407, "content").tolist() == [False, True, True, False, False, False]


def test_row_topk_keeps_top_ratio_of_each_row():
    s = torch.tensor([[1.0, 5.0, 3.0, 2.0], [9.0, 0.0, 8.0, 7.0]])
    m = threshold_mask(s, SelectionConfig(threshold="row_topk", ratio=0.5))
    assert m.tolist() == [[False, True, True, False], [True, False, True, False]]


def test_layer_topk_and_absolute():
    s = torch.tensor([[1.0, 5.0], [3.0, 2.0]])
    assert threshold_mask(s, SelectionConfig(threshold="layer_topk", ratio=0.5)).tolist() == [[False, True], [True, False]]
    assert threshold_mask(s, SelectionConfig(threshold="absolute", value=2.5)).tolist() == [[False, True], [True, False]]


def test_eq4_base_is_and_over_captions_and_eq5_6():
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    cfg = SelectionConfig(threshold="row_topk", ratio=0.5)
    caps = [torch.rand(8) + 0.1 for _ in range(3)]
    calib = [torch.rand(8) + 0.1 for _ in range(4)]
    per_caption = [caption_mask(w, c, cfg) for c in caps]
    direct_base = per_caption[0] & per_caption[1] & per_caption[2]
    assert torch.equal(base_mask(w, caps, cfg), direct_base)
    per_prompt = [caption_mask(w, c, cfg) for c in calib]
    direct_general = per_prompt[0] & per_prompt[1] & per_prompt[2] & per_prompt[3]
    assert torch.equal(general_mask(w, calib, cfg), direct_general)
    cm = concept_mask(direct_base, direct_general)
    assert torch.equal(cm, direct_base & ~direct_general)
    assert not (cm & direct_general).any()


def test_select_concept_neurons_statistics():
    torch.manual_seed(1)
    kv = {"a.attn2.to_k.weight": torch.randn(8, 6), "a.attn2.to_v.weight": torch.randn(8, 6)}
    cfg = SelectionConfig(threshold="row_topk", ratio=0.5)
    caps = [torch.rand(6) for _ in range(2)]
    calib = [torch.rand(6) for _ in range(3)]
    masks, stats = select_concept_neurons(kv, caps, calib, cfg)
    for name, w in kv.items():
        b, g = base_mask(w, caps, cfg), general_mask(w, calib, cfg)
        assert torch.equal(masks[name], b & ~g)
        layer = stats["layers"][name]
        assert layer["base_density"] == pytest.approx(b.float().mean().item())
        assert layer["general_share_of_base"] == pytest.approx((b & g).sum().item() / b.sum().item())
    total = sum(int(m.sum()) for m in masks.values())
    assert stats["total"]["concept_entries"] == total


def test_random_neurons_same_count_per_layer_and_seeded():
    masks = {"x": torch.rand(10, 10) > 0.7, "y": torch.rand(4, 5) > 0.2}
    r1, r2 = random_like_counts(masks, 3), random_like_counts(masks, 3)
    for n in masks:
        assert int(r1[n].sum()) == int(masks[n].sum())
        assert torch.equal(r1[n], r2[n])
    assert not all(torch.equal(random_like_counts(masks, 4)[n], r1[n]) for n in masks)


def test_bad_knobs_are_named():
    with pytest.raises(ValueError, match="method.selection.threshold"):
        SelectionConfig(threshold="median")
    with pytest.raises(ValueError, match="method.selection.tokens"):
        SelectionConfig(tokens="eos")
    with pytest.raises(ValueError, match="method.selection.value"):
        SelectionConfig(threshold="absolute")
