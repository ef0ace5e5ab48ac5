"""Run folders written by the release before ``methods/`` (tests/fixtures/runs_v0, made by 9dc1be9)
still resume, restore, generate and export; folders this code cannot read fail naming the folder.
LoRA folders written before the adapters were peft's (tests/fixtures/runs_v1, made by 82d2369)
restore as that code restored them and resume as it trained.

The fixtures hold 3 completed stages each. Resuming a copy with stage 3 deleted must rewrite stage 3
as the old code wrote it in one go (its tensor files, to float32 rounding across CPUs; textual
inversion now keeps only its token row).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from cns_lightning import continual
from cns_lightning.export import export_pipeline
from cns_lightning.generate import generate
from cns_lightning.restore import RestoreError, load_run
from conftest import FIXTURES, compose_cfg

V0 = FIXTURES / "runs_v0"
# the fixtures' command (tests/fixtures/runs_v0/README.md)
OVERRIDES = [
    "name=fixture", "data.concepts=[{name:dog_patch,source:microworld},{name:cup_heart,source:microworld},{name:cat_tabby,source:microworld}]",
    "method.steps=4", "prior.num_images=2", "prior.num_inference_steps=2", "trainer.enable_progress_bar=false", "++eval.enabled=false", "logger=none",
]


def _copy(tmp_path, method: str):
    run = tmp_path / "run"
    shutil.copytree(V0 / method, run)
    return run


@pytest.mark.parametrize("method", ["cns", "textual_inversion", "full_kv"])
def test_an_old_folder_resumes_bit_identically(tmp_path, method):
    run = _copy(tmp_path, method)
    last = sorted((run / "stages").iterdir())[-1]
    shutil.rmtree(last)  # interrupted before stage 3 was saved
    result = continual.run(compose_cfg(tmp_path, [*OVERRIDES, f"method={method}"]))
    assert result["status"] == "complete"
    old = V0 / method / "stages" / last.name
    new = sorted(p.name for p in last.glob("*.safetensors"))
    assert "token.safetensors" in new
    for name in new:
        # Same tensors, keys and dtypes; values to float32 rounding: the fixtures were written on
        # another CPU, whose kernels round differently (bit-identity holds on one machine:
        # tests/test_interrupt.py, tests/test_continual.py).
        a, b = load_file(last / name), load_file(old / name)
        assert a.keys() == b.keys(), f"{method}: {name} of stage 3 holds other tensors than the old code's"
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{method}: {name}[{k}]"
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=f"{method}: {name}[{k}] of stage 3 differs from the old code's")
    base = json.loads((V0 / method / "base_model.json").read_text())["fingerprint"]
    priors = [json.loads(p.read_text())["model"] for p in (tmp_path / "cache" / "priors").glob("*/done.json")]
    assert priors and set(priors) == {base}, "prior images are cached under another model fingerprint than the old release's"
    info = json.loads((last / "stage.json").read_text())
    assert info["format"] == 1 and info["method"] == method and info["method_target"].startswith("cns_lightning.methods.")


def test_an_old_folder_restores_generates_and_exports(tmp_path):
    run = V0 / "cns"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    pipe, learned = load_run(run)
    assert [c.name for c in learned] == ["dog_patch", "cup_heart", "cat_tabby"]
    out = generate(run, ["a <new1> dog and a <new3> cat"], n=1, steps=2, out=tmp_path / "images")
    assert len(list(out.glob("*.png"))) == 1
    exported = export_pipeline(run, tmp_path / "export")
    plain = StableDiffusionPipeline.from_pretrained(exported, safety_checker=None)
    for (n, p), q in zip(plain.unet.named_parameters(), pipe.unet.parameters()):
        assert torch.equal(p, q), n
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before, "the fixture was modified"


def test_textual_inversion_folders_of_both_releases_restore_alike(tmp_path):
    old, _ = load_run(V0 / "textual_inversion")
    run = tmp_path / "run"
    continual.run(compose_cfg(tmp_path, [*OVERRIDES, "method=textual_inversion"]))
    assert {p.name for p in (run / "stages" / "01_dog_patch").iterdir()} == {"token.safetensors", "stage.json", "manifest.json"}
    new, _ = load_run(run)
    # the fixture was trained on another CPU: equal to float32 rounding
    torch.testing.assert_close(old.text_encoder.get_input_embeddings().weight, new.text_encoder.get_input_embeddings().weight, rtol=1e-4, atol=1e-6)


def test_a_folder_of_a_newer_format_or_another_method_fails_naming_it(tmp_path):
    run = _copy(tmp_path, "cns")
    stage = run / "stages" / "02_cup_heart"
    info = json.loads((stage / "stage.json").read_text())
    manifest = json.loads((stage / "manifest.json").read_text())

    def rewrite(**changes):
        from cns_lightning.checkpoint import save_json

        manifest["files"]["stage.json"] = save_json(stage / "stage.json", {**info, **changes})
        save_json(stage / "manifest.json", manifest)

    rewrite(format=99)
    with pytest.raises(RestoreError, match=r"02_cup_heart: stage format 99 is newer than this code reads \(1\)\. Update cns_lightning to use it"):
        load_run(run)
    rewrite(method_target="cns_lightning.methods.full_kv.FullKV")
    with pytest.raises(RestoreError, match=r"02_cup_heart: written by method cns_lightning.methods.full_kv.FullKV but the run's config names cns_lightning.methods.cns.CNS.*run config: .*config.yaml"):
        load_run(run)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("neurons: concept", "neurons: sparse"))
    with pytest.raises(RestoreError, match=r"config.yaml: method has no _target_ \(and no neurons rule of an older run config\)"):
        load_run(run)
    rewrite(format=99)  # the loop's resume refuses it too (it rewrites config.yaml from the command first)
    with pytest.raises(continual.RunError, match=r"02_cup_heart: stage format 99 is newer .*\(resuming .*run\)"):
        continual.run(compose_cfg(tmp_path, [*OVERRIDES, "method=cns"]))


# ------------------------------------------------------------------ LoRA methods before peft
V1 = FIXTURES / "runs_v1"  # written by the LoRA methods' own forward-hook adapters (82d2369), before peft
LORA_METHODS = ["c_lora", "orthogonal_adaptation", "mix_of_show"]


@pytest.mark.parametrize("method", LORA_METHODS)
def test_a_lora_folder_of_the_hook_adapters_restores_as_that_code_restored_it(method):
    """The fixture's ``restored_weights.safetensors``: every adapted weight after stage 3 as the
    old code's ``load_run`` rebuilt it (the same float32 sum for C-LoRA / Orthogonal Adaptation;
    Mix-of-Show's fusion records its Gram matrices through peft's layers now, to float32 rounding)."""
    from cns_lightning.methods.lora import text_targets, unet_targets

    run = V1 / method
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    pipe, learned = load_run(run)
    assert [c.name for c in learned] == ["dog_patch", "cup_heart", "cat_tabby"]
    want = load_file(run / "restored_weights.safetensors")
    got = {f"unet.{n}": lin.weight for n, lin in unet_targets(pipe.unet, "attention" if method == "mix_of_show" else "kv").items()}
    if method == "mix_of_show":
        got |= {f"text_encoder.{n}": lin.weight for n, lin in text_targets(pipe.text_encoder).items()}
    assert got.keys() == want.keys()
    # bit-identical on the CPU that wrote the fixture; a last-bit rounding of B A elsewhere (1e-8 here
    # against deltas of ~1e-5); Mix-of-Show's pseudo-inverse of the recorded Gram matrices amplifies it
    tol = dict(rtol=1e-4, atol=1e-6) if method == "mix_of_show" else dict(rtol=1e-6, atol=1e-8)
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, **tol, msg=f"{method}: {k} differs from the old code's restore")
    assert not any("lora" in k for k in pipe.unet.state_dict())  # a plain model
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before, "the fixture was modified"


@pytest.mark.parametrize("method", LORA_METHODS)
def test_a_lora_folder_of_the_hook_adapters_resumes_as_that_code_trained(tmp_path, method):
    run = tmp_path / "run"
    shutil.copytree(V1 / method, run)
    last = sorted((run / "stages").iterdir())[-1]
    shutil.rmtree(last)  # interrupted before stage 3 was saved
    # Mix-of-Show's folders predate layer-wise tokens: resumed with one token per concept, as written
    # (the default, layerwise_tokens=true, is refused as a changed setting: test_layerwise_tokens.py)
    extra = ["method.layerwise_tokens=false"] if method == "mix_of_show" else []
    result = continual.run(compose_cfg(tmp_path, [*OVERRIDES, f"method={method}", *extra]))
    assert result["status"] == "complete"
    old = V1 / method / "stages" / last.name
    for name in ("pytorch_lora_weights.safetensors", "token.safetensors"):
        a, b = load_file(last / name), load_file(old / name)
        assert a.keys() == b.keys(), f"{method}: {name} of stage 3 holds other tensors than the old code's"
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{method}: {name}[{k}]"
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=f"{method}: {name}[{k}] of stage 3 differs from the old code's")
