"""Mix-of-Show (``methods/mix_of_show.py``): gradient fusion against a direct least-squares solve,
each concept trained from the base model (peft adapters on the UNet and the text encoder, whose
saved files diffusers' loader turns back into that concept's model), the fused model reproducing
each concept's LoRA outputs."""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from cns_lightning import continual
from cns_lightning.methods.lora import text_targets, unet_targets
from cns_lightning.methods.mix_of_show import PROMPTS_FILE, gradient_fusion
from cns_lightning.restore import build_base
from cns_lightning.state import read_stage
from conftest import FAST, compose_cfg, concepts_override, make_concept_folder, text_output, unet_output


def _case(n_rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(5, 6, generator=g, dtype=torch.float64)
    deltas = [torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    xs = [torch.randn(n_rows, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    return w0, deltas, xs


def test_gradient_fusion_matches_a_direct_least_squares_solve():
    w0, deltas, xs = _case(n_rows=5)  # 10 input rows in all, 6 features: one exact minimiser
    fused = gradient_fusion(w0, deltas, [x.t() @ x for x in xs])
    x = torch.cat(xs)
    y = torch.cat([xi @ (w0 + d).t() for xi, d in zip(xs, deltas)])
    direct = torch.linalg.lstsq(x, y, driver="gelsd").solution.t()
    assert torch.allclose(fused, direct, atol=1e-8)


def test_gradient_fusion_keeps_the_base_weight_where_no_input_reaches():
    w0, deltas, xs = _case(n_rows=2)  # 4 rows span 4 of 6 directions
    fused = gradient_fusion(w0, deltas, [x.t() @ x for x in xs])
    x = torch.cat(xs)
    r = torch.cat([xi @ d.t() for xi, d in zip(xs, deltas)])
    direct = w0 + torch.linalg.lstsq(x, r, driver="gelsd").solution.t()  # the minimum-norm change of W_0
    assert torch.allclose(fused, direct, atol=1e-8)
    null = torch.linalg.svd(x).Vh[4:]  # directions no input has
    assert torch.allclose(fused @ null.t(), w0 @ null.t(), atol=1e-8)


def test_gradient_fusion_reproduces_each_concept_on_disjoint_inputs():
    w0, deltas, _ = _case(n_rows=2)
    basis = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    xs = [torch.randn(3, 3, dtype=torch.float64) @ basis[:, :3].t(), torch.randn(3, 3, dtype=torch.float64) @ basis[:, 3:].t()]
    fused = gradient_fusion(w0, deltas, [x.t() @ x for x in xs])
    for x, d in zip(xs, deltas):
        assert torch.allclose(x @ fused.t(), x @ (w0 + d).t(), atol=1e-8)


def test_each_concept_trains_from_the_base_model_and_the_fusion_keeps_both(tmp_path):
    dirs = [make_concept_folder(tmp_path / "data" / n, n=3, seed=k) for k, n in enumerate(("teddy", "mug"))]
    # one token per concept: the UNet is called with plain text states below (layer-wise tokens: test_layerwise_tokens.py)
    cfg = compose_cfg(tmp_path, [concepts_override(dirs), "method=mix_of_show", "method.layerwise_tokens=false", *FAST, "~logger", "calibration.num_prompts=4",
                                 "method.lr_lora=1e-2", "method.lr_text=1e-2", "method.fusion_steps=3", "method.steps=6"])
    r = continual.check_inputs(cfg)
    continual.build(r)
    continual.make_priors(r)
    continual.restore(r)
    lins = {**{f"unet.{n}": m for n, m in unet_targets(r.ctx.pipe.unet, "attention").items()},
            **{f"text_encoder.{n}": m for n, m in text_targets(r.ctx.pipe.text_encoder).items()}}
    w0 = {n: m.weight.detach().clone() for n, m in lins.items()}
    ids = build_base(cfg).tokenizer(["a photo of a mug"], padding="max_length", max_length=16, return_tensors="pt").input_ids  # no new token
    own = []  # each concept's own adapted model: (UNet output, text encoder output) at the end of its training
    for m in range(2):
        stage = r.method.begin_stage(r.ctx, m, r.concepts[m])
        assert all(torch.equal(lin.weight, w0[n]) for n, lin in lins.items()), f"stage {m + 1} does not start from the base model"
        layers = dict(r.ctx.pipe.unet.named_modules()) | dict(r.ctx.pipe.text_encoder.named_modules())
        assert all(isinstance(layers[k.split(".", 1)[1]], LoraLayer) for k in lins)  # peft's layers, UNet and text encoder
        steps = continual.fit_stage(r, m, stage, [])
        own.append((unet_output(r.ctx.pipe.unet), text_output(r.ctx.pipe.text_encoder, ids)))
        info = continual.save_stage(r, m, steps, 0.0)
        assert info["merge_seconds"] > 0
        assert not any(isinstance(x, LoraLayer) for x in [*r.ctx.pipe.unet.modules(), *r.ctx.pipe.text_encoder.modules()])
    stages = [read_stage(p) for p in sorted((tmp_path / "run" / "stages").iterdir())]
    assert all(s.json[PROMPTS_FILE]["prompts"] for s in stages)
    # diffusers' own loader, one stage's file on the base model: that concept's own model (UNet and text encoder)
    for s, (unet_out, text_out) in zip(stages, own):
        base = build_base(cfg)
        assert not torch.allclose(unet_output(base.unet), unet_out, atol=1e-3) and not torch.allclose(text_output(base.text_encoder, ids), text_out, atol=1e-3)
        base.load_lora_weights(s.folder)
        assert torch.allclose(unet_output(base.unet), unet_out, atol=1e-5)
        assert torch.allclose(text_output(base.text_encoder, ids), text_out, atol=1e-5)
    # the fused weight is the best single weight for every concept's own layer outputs on the inputs
    # its model saw: its summed error is at most that of W_0 or of any one concept's own weight
    fused_weights = {key: lin.weight.detach().double().clone() for key, lin in lins.items()}
    grams = [r.method.concept_grams(r.ctx, i) for i in range(2)]  # each concept's inputs, recorded again
    for key, lin in lins.items():
        prefix, name = key.split(".", 1)
        owns = [w0[key].double() + b.double() @ a.double() for a, b in (s[prefix][name] for s in r.method.saved)]
        gs = [g[prefix][name] for g in grams]

        def error(w):
            return sum(torch.trace((w - own) @ g @ (w - own).t()) for own, g in zip(owns, gs))

        fused = fused_weights[key]
        assert all(error(fused) <= error(w) * (1 + 1e-6) + 1e-9 for w in [w0[key].double(), *owns]), key
        assert not torch.equal(fused, w0[key].double())
