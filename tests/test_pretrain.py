"""The micro models' pretraining: the warm start keeps the earlier UNet's function, and a stopped
UNet stage resumes from its checkpoint instead of starting over."""

import json

import torch
from diffusers import UNet2DConditionModel

from cns_lightning.microworld.trainstate import load_training_state
from cns_lightning.microworld import arch
from cns_lightning.microworld.pretrain import main


def _small_unet(attention="all", **kw) -> UNet2DConditionModel:
    return arch.build_unet(attention, block_out_channels=(16, 32, 32), attention_head_dim=4, norm_num_groups=8, **kw)


def test_warm_start_from_a_unet_with_fewer_attention_levels_is_exact():
    torch.manual_seed(0)
    old = _small_unet("low").eval()
    new = _small_unet().eval()
    blocks = arch.warm_start(new, old.state_dict())
    assert blocks == ["down_blocks.0.attentions.0", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1"]
    x, t, h = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 77, 64)
    with torch.no_grad():
        assert torch.equal(old(x, t, h).sample, new(x, t, h).sample)
    # the same architecture: every weight is copied, no block is new
    again = _small_unet().eval()
    assert arch.warm_start(again, new.state_dict()) == []
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), new.state_dict().values()))


def test_warm_start_into_a_new_text_width_keeps_every_other_weight_and_starts_unconditional():
    torch.manual_seed(0)
    old = _small_unet("low").eval()  # cross_attention_dim 64
    new = _small_unet("low", cross_attention_dim=128).eval()
    assert arch.warm_start(new, old.state_dict()) == []
    kv = [k for k in new.state_dict() if "attn2.to_k" in k or "attn2.to_v" in k]
    assert kv and all(new.state_dict()[k].shape[1] == 128 for k in kv)
    for k, v in new.state_dict().items():
        if "attn2.to_v" in k:
            assert not v.any(), k
        elif k not in kv:
            assert torch.equal(v, old.state_dict()[k]), k
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():  # zero values: the text states do not matter yet
        assert torch.allclose(new(x, t, torch.randn(2, 77, 128)).sample, new(x, t, torch.randn(2, 77, 128)).sample, atol=1e-6)


def _pretrain(out, steps, max_seconds="1000"):
    main([
        "--out", str(out), "--stages", "clip,vae,unet", "--n-train", "32", "--workers", "1", "--text-width", "32",
        "--clip-steps", "2", "--clip-batch", "8", "--vae-steps", "2", "--vae-batch", "8",
        "--unet-steps", str(steps), "--unet-batch", "4", "--unet-max-seconds", max_seconds, "--ckpt-every", "2", "--unet-attention", "all",
    ])  # fmt: skip


def test_pretraining_resumes_from_its_checkpoint(tmp_path):
    # the time cap (0 s) stops the UNet after its first step; the checkpoint holds step 1
    _pretrain(tmp_path, steps=4, max_seconds="0")
    ckpt = load_training_state(tmp_path / "checkpoint_unet.pt")
    assert ckpt["step"] == 1
    assert json.loads((tmp_path / "progress.json").read_text()) == {"clip": 2, "vae": 2}
    # the rerun loads the finished CLIP and VAE and continues the UNet at step 1
    _pretrain(tmp_path, steps=4)
    log = (tmp_path / "log.txt").read_text()
    assert "clip: finished earlier" in log and "vae: finished earlier" in log
    assert "unet resumed from" in log and "at step 1" in log
    assert load_training_state(tmp_path / "checkpoint_unet.pt")["step"] == 4
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "pipeline" / "unet")
    assert unet.config.cross_attention_dim == 32
    assert list(unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 3


def test_identity_scenes_are_captioned_in_world_words_only():
    """make_data(identity_share=...): random identities (never the 20 concepts) named by the
    world's words alone; glyphs by their noun without colour or pattern."""
    import numpy as np

    from cns_lightning.microworld import concepts as C
    from cns_lightning.microworld import world as W
    from cns_lightning.microworld.pretrain import make_data
    from cns_lightning.tokenizer import clip_tokenizer

    imgs, ids = make_data(40, seed=3, workers=1, identity_share=0.5)
    assert imgs.shape == (40, 64, 64, 3) and ids.shape == (40, 2, 77)
    tok = clip_tokenizer()
    words = set(W.COLOURS) | set(W.NOUNS) | set(W.PATTERNS) | set(W.BACKGROUNDS) | set(W.STYLES[1:])
    words |= {"a", "small", "large", "on", "the", "left", "right", "at", "top", "bottom", "in", "center", "and", "background", "style", ","}
    captions = [tok.decode(row, skip_special_tokens=True).replace("</w>", " ") for row in ids[20:, 0]]
    for cap in captions:
        assert set(cap.replace(",", " , ").split()) <= words, cap
        assert "{token}" not in cap and not any(name in cap for name in C.CONCEPTS)
    # some identity scenes leave out colour words a world object would have
    assert any(not (set(cap.split()) & set(W.COLOURS)) for cap in captions)
    # the two halves differ: world scenes first, identities after
    assert not np.array_equal(imgs[:20], imgs[20:])


def test_an_identity_share_outside_0_to_1_is_refused_naming_the_flag(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "p"), "--identity-share", "1.5"])
    assert e.value.code != 0
    assert "--identity-share 1.5" in capsys.readouterr().err
    assert not (tmp_path / "p").exists(), "nothing is written for a refused command"
