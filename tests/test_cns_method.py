"""methods/cns.py: which weights the selection scores in a continual run (``selection.weights``)."""

from __future__ import annotations

import torch

from cns_lightning import continual
from cns_lightning.models import cross_attention_kv
from conftest import FAST, compose_cfg, concepts_override, make_concept_folder


def _second_selection(tmp_path, weights: str):
    """Stage 1 trained and merged; then stage 2's selection, and the same selection on W_0 and on the live K/V."""
    dirs = [make_concept_folder(tmp_path / "data" / n, n=3, seed=k) for k, n in enumerate(("teddy", "mug"))]
    cfg = compose_cfg(tmp_path, [concepts_override(dirs), "method=cns", *FAST, "~logger", "calibration.num_prompts=4",
                                 "method.lr_neurons=1e-2", "method.steps=4", f"method.selection.weights={weights}"])
    r = continual.check_inputs(cfg)
    continual.build(r)
    continual.make_priors(r)
    continual.restore(r)
    method = r.method
    stage = method.begin_stage(r.ctx, 0, r.concepts[0])
    continual.save_stage(r, 0, continual.fit_stage(r, 0, stage, []), 0.0)
    live = {n: p.detach().clone() for n, p in cross_attention_kv(r.ctx.pipe.unet).items()}
    assert any(not torch.equal(live[n], method.initial[n]) for n in live), "stage 1 did not move K/V"
    got, _ = method.select(r.ctx, 1, r.concepts[1])
    on = {name: method.select_on(r.ctx, r.concepts[1], kv)[0] for name, kv in (("base", method.initial), ("current", live))}
    return got, on


def test_the_default_scores_the_live_weights_and_base_scores_w0(tmp_path):
    got, on = _second_selection(tmp_path / "current", "current")
    assert all(torch.equal(got[n], on["current"][n]) for n in got)
    assert any(not torch.equal(on["current"][n], on["base"][n]) for n in got), "stage 1 left the selection unchanged: the test shows nothing"
    got, on = _second_selection(tmp_path / "base", "base")
    assert all(torch.equal(got[n], on["base"][n]) for n in got)
