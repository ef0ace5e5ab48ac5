"""prior.py: the prior-image cache, the reduced-precision sampling copy, and leftovers of killed runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cns_lightning.models import build_random_pipeline
from cns_lightning.preflight import ConfigValueError, check_config_values
from cns_lightning.prior import (
    cache_key,
    decode_latents,
    prior_images,
    prompt_embeddings,
    remove_stale_temporaries,
    sampling_pipeline,
    sampling_precision,
    sample_images,
)

KW = dict(resolution=32, num_inference_steps=3, guidance_scale=6.0)


@pytest.fixture(scope="module")
def pipe():
    return build_random_pipeline("tiny", seed=0)


def _pixels(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in paths]


def test_images_are_cached_and_do_not_depend_on_the_batch_size(pipe, tmp_path):
    a = prior_images(pipe, "a photo of a dog", 5, tmp_path / "a", batch_size=2, **KW)
    assert [p.name for p in a] == [f"{i:04d}.png" for i in range(5)]
    assert (a[0].parent / "done.json").is_file()
    mtimes = [p.stat().st_mtime_ns for p in a]
    again = prior_images(pipe, "a photo of a dog", 5, tmp_path / "a", batch_size=2, **KW)
    assert again == a and [p.stat().st_mtime_ns for p in again] == mtimes, "a complete folder was generated again"
    b = prior_images(pipe, "a photo of a dog", 5, tmp_path / "b", batch_size=5, **KW)
    for x, y in zip(_pixels(a), _pixels(b)):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1  # each image has its own seeded generator
    other = prior_images(pipe, "a photo of a cat", 5, tmp_path / "a", batch_size=2, **KW)
    assert other[0].parent != a[0].parent
    assert not any(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(other)))


def test_cache_key_names_precision_and_compilation():
    base = ("fp", "a dog", 0, 8, 512, 50, 6.0)
    keys = {cache_key(*base), cache_key(*base, "bf16"), cache_key(*base, "fp16"), cache_key(*base, "bf16", True)}
    assert len(keys) == 4
    assert cache_key(*base) == cache_key(*base, "fp32", False)


def test_sampling_precision_is_fp32_on_cpu_and_checked():
    assert sampling_precision(torch.device("cpu"), "bf16") == "fp32"
    assert sampling_precision(torch.device("cuda"), "bf16") == "bf16"
    assert sampling_precision(torch.device("cuda"), "fp32") == "fp32"
    with pytest.raises(ValueError, match="prior.precision='fp8'"):
        sampling_precision(torch.device("cuda"), "fp8")
    with pytest.raises(ConfigValueError, match="prior.precision='fp8'.*bf16, fp16, fp32"):
        check_config_values(OmegaConf.create({"prior": {"precision": "fp8"}}))
    check_config_values(OmegaConf.create({"prior": {"precision": "fp16", "compile": False}}))


def test_bf16_sampling_copy_leaves_the_training_weights_alone(pipe):
    before = {k: v.clone() for m in (pipe.unet, pipe.vae) for k, v in m.state_dict().items()}
    sampler = sampling_pipeline(pipe, "bf16", channels_last=True)
    after = {k: v for m in (pipe.unet, pipe.vae) for k, v in m.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert pipe.unet.dtype == torch.float32 and sampler.unet.dtype == torch.bfloat16 and sampler.vae.dtype == torch.bfloat16
    assert sampler.unet is not pipe.unet and sampler.text_encoder is None and sampler.scheduler is pipe.scheduler
    assert not any(t.is_meta for m in (sampler.unet, sampler.vae) for t in [*m.parameters(), *m.buffers()])
    for name, p in sampler.unet.named_parameters():  # the same weights, rounded to bf16
        assert torch.equal(p, pipe.unet.get_parameter(name).to(torch.bfloat16)), name
    assert sampling_pipeline(pipe, "fp32") is pipe

    cond, uncond = prompt_embeddings(pipe, "a photo of a dog", torch.device("cpu"))
    assert cond.shape == uncond.shape == (1, 77, pipe.text_encoder.config.hidden_size)

    def run(p, dtype):
        g = [torch.Generator().manual_seed(i) for i in range(2)]
        return p(prompt_embeds=cond.expand(2, -1, -1).to(dtype), negative_prompt_embeds=uncond.expand(2, -1, -1).to(dtype),
                 num_inference_steps=3, height=32, width=32, generator=g, output_type="np").images

    low, ref = run(sampler, torch.bfloat16), run(pipe, torch.float32)
    assert low.shape == ref.shape == (2, 32, 32, 3)
    assert 0 < np.abs(low - ref).max() < 0.1  # bf16 rounding, not another image


def test_leftovers_of_killed_generations_are_removed(pipe, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    parent = tmp_path / "priors"
    key = "k" * 20
    stale = parent / f"{key}.tmp-{host}-{dead.pid}-abc123"
    live = parent / f"{key}.tmp-{host}-{os.getpid()}-def456"
    elsewhere = parent / f"{key}.tmp-another-host-{dead.pid}-ghi789"
    unrelated = parent / f"{'j' * 20}.tmp-{host}-{dead.pid}-xyz000"
    for d in (stale, live, elsewhere, unrelated):
        d.mkdir(parents=True)
        (d / "0000.png").write_bytes(b"partial")
    assert remove_stale_temporaries(parent, key) == [stale]
    assert not stale.exists() and live.exists() and elsewhere.exists() and unrelated.exists()

    # prior_images cleans its own key's stale folders before it generates
    fp = "f" * 16
    real_key = cache_key(fp, "a photo of a dog", 0, 2, 32, 3, 6.0)
    leftover = parent / f"{real_key}.tmp-{host}-{dead.pid}-zzz111"
    leftover.mkdir()
    paths = prior_images(pipe, "a photo of a dog", 2, tmp_path, fingerprint=fp, batch_size=2, **KW)
    assert len(paths) == 2 and not leftover.exists()
    assert sorted(d.name for d in parent.iterdir() if d.name.startswith(real_key)) == [real_key]


def test_sample_images_matches_the_pipelines_own_decode_and_postprocess(pipe):
    """fp32: the chunked decode with pixels converted on the device gives the pipeline's exact pixels."""
    cond, uncond = prompt_embeddings(pipe, "a photo of a dog", torch.device("cpu"))

    def gens():
        return [torch.Generator().manual_seed(i) for i in range(5)]

    ref = pipe(prompt_embeds=cond.expand(5, -1, -1), negative_prompt_embeds=uncond.expand(5, -1, -1), num_inference_steps=3,
               height=32, width=32, generator=gens(), output_type="pil").images
    ref = np.stack([np.asarray(b) for b in ref])
    ours = sample_images(pipe, cond, uncond, gens(), 3, 7.5, 32, decode_batch=5)
    assert ours.dtype == torch.uint8 and ours.shape == (5, 32, 32, 3) and ours.device.type == "cpu"
    assert np.array_equal(ours.numpy(), ref)  # the same batch through the decoder: the same bits
    chunked = sample_images(pipe, cond, uncond, gens(), 3, 7.5, 32, decode_batch=2)
    assert np.abs(chunked.numpy().astype(int) - ref).max() <= 1  # other conv batch sizes: rounding only
    # padding a short last chunk (what a compiled decoder needs) changes nothing beyond rounding
    latents = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    plain, padded = decode_latents(pipe.vae, latents, 2), decode_latents(pipe.vae, latents, 2, pad=True)
    assert (plain.int() - padded.int()).abs().max() <= 1
