"""sampling.py: one sampler for prior images and evaluation: its bf16 copy follows the live weights
in place, images do not depend on the batch, prior images and the evaluator can share one sampler,
and bf16 evaluation scores agree with fp32 within the tolerance docs/evaluation.md states."""

from __future__ import annotations

import pytest
import torch

from cns_lightning.evaluation import ContinualEvaluator
from cns_lightning.models import build_random_pipeline, cross_attention_kv
from cns_lightning.prior import prior_images
from cns_lightning.sampling import Sampler, supported_precision


@pytest.fixture(scope="module")
def pipe():
    return build_random_pipeline("tiny")


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _sample(sampler, seeds, prompt="a photo of a dog"):
    cond, uncond = sampler.embed([prompt])
    return sampler.sample(cond, uncond, _gens(seeds), 2, 6.0, 32)


def test_a_cpu_samples_in_fp32_with_the_pipeline_itself(pipe):
    s = Sampler("bf16").bind(pipe)
    assert supported_precision(torch.device("cpu"), "bf16") == "fp32"
    assert s.runs_in(torch.device("cpu")) == ("fp32", False) and s.pipeline is pipe
    with pytest.raises(ValueError, match="precision='bf17'"):
        Sampler("bf17")


def test_the_bf16_copy_follows_the_live_weights_in_place(pipe):
    s = Sampler("bf16", on_cpu=True).bind(pipe)
    copy = s.pipeline
    assert copy is not pipe and copy.unet.dtype == torch.bfloat16 and pipe.unet.dtype == torch.float32
    before = _sample(s, [1, 2])
    kv = cross_attention_kv(pipe.unet)
    saved = {k: v.detach().clone() for k, v in kv.items()}
    try:
        with torch.no_grad():
            for v in kv.values():
                v.add_(0.5)
        s.bind(pipe)
        assert s.pipeline is copy  # refreshed, not rebuilt (compiled graphs stay valid)
        for name, v in cross_attention_kv(copy.unet).items():
            assert torch.equal(v, kv[name].detach().to(torch.bfloat16))
        after = _sample(s, [1, 2])
        assert not torch.equal(before, after)
        assert torch.equal(after, _sample(Sampler("bf16", on_cpu=True).bind(pipe), [1, 2]))  # = a fresh copy
    finally:
        with torch.no_grad():
            for k, v in kv.items():
                v.copy_(saved[k])
    assert pipe.unet.dtype == torch.float32  # the live weights were never cast


def test_an_image_does_not_depend_on_its_batch(pipe):
    s = Sampler("fp32").bind(pipe)
    together = _sample(s, [5, 6, 7])
    alone = torch.cat([_sample(s, [k]) for k in (5, 6, 7)])
    assert together.dtype == torch.uint8 and together.shape == (3, 32, 32, 3)
    assert (together.int() - alone.int()).abs().max() <= 1


def test_prior_images_and_the_evaluator_share_one_sampler(pipe, tmp_path):
    s = Sampler("bf16", on_cpu=True)
    paths = prior_images(pipe, "a photo of a dog", 2, tmp_path, resolution=32, num_inference_steps=2, batch_size=2, sampler=s)
    assert len(paths) == 2
    copy = s.pipeline  # kept after the prior images (the loop hands it to the evaluator)
    ev = ContinualEvaluator(precision="bf16")
    assert not ev.use_sampler(s)  # other settings (on_cpu): not taken
    ev.sampler = Sampler("bf16", on_cpu=True)
    assert ev.use_sampler(s) and ev.sampler is s
    ev.generate(pipe, ["a photo of a cat"])
    assert s.pipeline is copy
    # prior_images without a sampler makes its own and frees it; the cache key names the precision
    other = prior_images(pipe, "a photo of a dog", 2, tmp_path, resolution=32, num_inference_steps=2, batch_size=2)
    assert other[0].parent != paths[0].parent


def test_bf16_evaluation_scores_agree_with_fp32(pipe, tmp_path):
    """The tolerance docs/evaluation.md states for the tiny pipeline: CLIP-T within 1.0 and CLIP-I
    within 1.0 (of 100) per prompt's mean over its samples."""
    from cns_lightning.evaluation.prompts import EvalPrompt

    prompts = [EvalPrompt(generate=p, clip_text=p, concepts=()) for p in ("a photo of a dog", "a red car", "a cat on a table", "a canal in Amsterdam")]
    scores = {}
    for precision in ("fp32", "bf16"):
        ev = ContinualEvaluator(n_images=4, num_inference_steps=10, guidance_scale=6.0, batch_size=8, resolution=32)
        ev.sampler = Sampler(precision, on_cpu=True)
        ev.setup(tmp_path / precision, [], "cpu")
        assert ev.state.settings["sampler_precision"] == precision  # recorded with the scores
        images = ev.generate(pipe, [p.generate for p in prompts])
        scores[precision] = ev.score(prompts, images)
    per = [(a["clip_t"], b["clip_t"]) for a, b in zip(scores["fp32"]["prompts"], scores["bf16"]["prompts"])]
    diffs = [abs(sum(a) / len(a) - sum(b) / len(b)) for a, b in per]
    assert max(diffs) <= 1.0, diffs
    assert abs(scores["fp32"]["clip_t"] - scores["bf16"]["clip_t"]) <= 1.0
