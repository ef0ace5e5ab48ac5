"""The contract every registered method keeps (``methods.METHODS``: a new method gets these for free).

Each method runs the loop's own phases (``continual.check_inputs`` .. ``save_stage``) for two
concepts on the tiny model, and:

* a stage's training changes only what its ``TrainingStage.trainable()`` declares (bit-exact), and changes it;
* the saved stages, loaded into a fresh base model (``Method.load`` via ``restore.load_run``), give
  the live model after the loop's last merge step (``save_stage`` runs ``Method.merge``), bit-identical;
* a run interrupted after stage 1 and resumed writes stage 2 bit-identical to an uninterrupted run;
* ``export`` writes a folder plain ``StableDiffusionPipeline.from_pretrained`` loads, with the
  restored (fused) weights under plain module names (no adapter layer left, no LoRA file);
* a bad value of any knob the method declares, or a key it does not declare, fails before anything
  is written, naming the key.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline

from cns_lightning import continual
from cns_lightning.export import export_pipeline
from cns_lightning.methods import METHODS, Method, build_method, method_class
from cns_lightning.preflight import ConfigValueError, leaf_keys, check_method_keys
from cns_lightning.restore import load_run
from conftest import CONF, FAST, compose_cfg, concepts_override, make_concept_folder

NAMES = ("teddy", "mug")
STAGE_TENSORS = ".safetensors"


def _overrides(dirs, method: str) -> list[str]:
    return [concepts_override(dirs), f"method={method}", *FAST, "~logger", "calibration.num_prompts=4"]


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"unet.{n}": p.detach().clone() for n, p in pipe.unet.named_parameters()} | {
        f"text.{n}": p.detach().clone() for n, p in pipe.text_encoder.named_parameters()
    } | {f"vae.{n}": p.detach().clone() for n, p in pipe.vae.named_parameters()}


def _names(pipe) -> dict[int, str]:
    out = {}
    for prefix, m in (("unet", pipe.unet), ("text", pipe.text_encoder), ("vae", pipe.vae)):
        out.update({id(p): f"{prefix}.{n}" for n, p in m.named_parameters()})
    return out


def _stage_bytes(run_dir) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted((run_dir / "stages").glob(f"*/*{STAGE_TENSORS}"))}


@pytest.fixture(scope="module", params=sorted(METHODS))
def trained(request, tmp_path_factory):
    """The loop's phases for 2 concepts with one method; what each stage changed, the live weights."""
    tmp = tmp_path_factory.mktemp(request.param)
    dirs = [make_concept_folder(tmp / "data" / n, n=3, seed=k) for k, n in enumerate(NAMES)]
    r = continual.check_inputs(compose_cfg(tmp, _overrides(dirs, request.param)))
    continual.build(r)
    continual.make_priors(r)
    continual.restore(r)
    changes = []
    for m in range(len(NAMES)):
        # A method that trains each concept from the base model resets its weights in begin_stage
        # (and adapters join the model there): what the training changes is measured from after it.
        stage = r.method.begin_stage(r.ctx, m, r.concepts[m])
        before = _weights(r.ctx.pipe)
        declared = {_names(r.ctx.pipe)[id(p)]: mask for p, mask in stage.trainable()}
        steps = continual.fit_stage(r, m, stage, [])
        changes.append((before, _weights(r.ctx.pipe), declared))
        continual.save_stage(r, m, steps, 0.0)  # with the loop's fusion step (a no-op for methods with one model)
    return dict(method=request.param, tmp=tmp, dirs=dirs, run=r, changes=changes, live=_weights(r.ctx.pipe))


def test_registered_methods_are_methods():
    assert {"cns", "random_neurons", "full_kv", "textual_inversion", "custom_diffusion", "c_lora", "orthogonal_adaptation", "mix_of_show"} <= set(METHODS)
    for name, cls in METHODS.items():
        assert issubclass(cls, Method) and cls.declared_knobs()[0].key == "steps", name


def test_a_stage_changes_only_what_it_declares_trainable(trained):
    for m, (before, after, declared) in enumerate(trained["changes"]):
        changed = 0
        for name, b in before.items():
            a = after[name]
            if name in declared:
                mask = declared[name].expand(a.shape).cpu()
                assert torch.equal(a[~mask], b[~mask]), f"stage {m + 1}: {name} changed outside what the stage declares"
                changed += int((a[mask] != b[mask]).sum())
            else:
                assert torch.equal(a, b), f"stage {m + 1}: {name} changed but the stage does not declare it trainable"
        assert changed > 0, f"stage {m + 1}: nothing it declares trainable changed"


def test_save_then_load_gives_the_live_model_bit_identical(trained):
    pipe, learned = load_run(trained["run"].run_dir)  # a fresh base model + Method.load of the saved stages
    assert [c.name for c in learned] == list(NAMES)
    loaded = _weights(pipe)
    for name, w in trained["live"].items():
        assert torch.equal(loaded[name], w), f"{name} differs after save + load"


def test_resume_after_an_interruption_is_bit_identical(trained, tmp_path):
    dirs, method = trained["dirs"], trained["method"]
    cfg = compose_cfg(tmp_path, _overrides(dirs, method))
    result = continual.run(cfg)
    assert all(s["merge_seconds"] >= 0 and s["method"] == method for s in result["stages"]), "the loop times every merge step"
    reference = _stage_bytes(tmp_path / "run")
    assert len({k.split("/")[1] for k in reference}) == len(NAMES)
    shutil.rmtree(sorted((tmp_path / "run" / "stages").iterdir())[-1])  # stage 2 never finished
    continual.run(cfg)
    assert _stage_bytes(tmp_path / "run") == reference


def test_export_loads_in_plain_diffusers(trained, tmp_path):
    out = export_pipeline(trained["run"].run_dir, tmp_path / "export")
    plain = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    restored, learned = load_run(trained["run"].run_dir, tokens="learned")
    for part in ("unet", "text_encoder"):  # the fused weights, under plain diffusers / transformers names (no adapter left)
        exported, fused = getattr(plain, part).state_dict(), getattr(restored, part).state_dict()
        assert exported.keys() == fused.keys() and not any("lora" in k or "base_layer" in k for k in exported), part
        for n, p in exported.items():
            assert torch.equal(p, fused[n]), f"{part}.{n}"
    assert torch.equal(plain.text_encoder.get_input_embeddings().weight, restored.text_encoder.get_input_embeddings().weight)
    assert not list(out.rglob("*lora*")), "the export is a plain pipeline folder, no LoRA file beside it"
    for c in learned:
        assert plain.tokenizer.convert_tokens_to_ids(c.token) == restored.tokenizer.convert_tokens_to_ids(c.token)


def _bad_value(knob) -> str:
    return {"int": "abc", "float": "abc", "float_or_null": "abc", "bool": "maybe", "choice": "no_such_choice"}[knob.kind]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_bad_knob_fails_before_anything_is_written(tmp_path, method):
    dirs = [make_concept_folder(tmp_path / "data" / n, n=3, seed=k) for k, n in enumerate(NAMES[:1])]
    for knob in METHODS[method].declared_knobs():
        cfg = compose_cfg(tmp_path, [*_overrides(dirs, method), f"method.{knob.key}={_bad_value(knob)}"])
        with pytest.raises(ConfigValueError, match=rf"method\.{knob.key}="):
            continual.run(cfg)
    cfg = compose_cfg(tmp_path, [*_overrides(dirs, method), "+method.lamda1=0.5"])  # a typo: not a knob of this method
    with pytest.raises(ConfigValueError, match=r"method\.lamda1 is not a knob of method"):
        continual.run(cfg)
    assert not (tmp_path / "run").exists(), "a run folder was written for a bad knob"


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "method").glob("*.yaml")))
def test_each_method_config_names_its_class_and_only_its_knobs(tmp_path, option):
    """conf/method/<option>.yaml composes (hydra.compose, in-process) to a ``_target_`` of a
    registered method and exactly the keys that method declares (the shared ones included)."""
    cfg = compose_cfg(tmp_path, [f"method={option}"])
    cls = method_class(cfg.method)
    assert cls in METHODS.values()
    check_method_keys(cfg)
    declared = {k.key for k in cls.declared_knobs()}
    keys = {k for k in leaf_keys(cfg.method, "")} - {"name"}
    assert keys == declared, f"{option}: keys {sorted(keys ^ declared)} are set but not declared, or declared but not set"
    built = build_method(cfg.method)
    assert isinstance(built, cls) and built.name == cfg.method.name


def test_every_registered_method_has_a_config():
    targets = set()
    for p in (CONF / "method").glob("*.yaml"):
        text = p.read_text()
        targets |= {line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("_target_:")}
    assert {cls.target() for cls in METHODS.values()} <= targets


@pytest.mark.parametrize("option", ["cns", "no_reg", "random_neurons"])
def test_the_micro_model_calibrates_the_cns_family_and_a_command_still_overrides(tmp_path, option):
    """conf/model_method/micro_<method>.yaml (Hydra's specialization by model and method): the
    micro world's selection share and rates for CNS and its ablations, and for no other method or
    model; a command's own method.* override wins."""
    micro = compose_cfg(tmp_path, ["+experiment=seq7", f"method={option}"])
    assert (micro.method.selection.ratio, micro.method.lr_neurons, micro.method.lr_token) == (0.3, 1e-4, 5e-3)
    check_method_keys(micro)
    own = compose_cfg(tmp_path, ["+experiment=seq7", f"method={option}", "method.selection.ratio=0.2", "method.lr_token=1e-3"])
    assert (own.method.selection.ratio, own.method.lr_token) == (0.2, 1e-3)
    tiny = compose_cfg(tmp_path, ["model=tiny", f"method={option}"])
    assert (tiny.method.selection.ratio, tiny.method.lr_neurons, tiny.method.lr_token) == (0.1, 3e-5, 5e-4)
    kv = compose_cfg(tmp_path, ["+experiment=seq7", "method=full_kv"])
    assert (kv.method.lr_neurons, kv.method.lr_token) == (1e-5, 5e-4)


def test_the_micro_model_calibrates_c_lora_and_a_command_still_overrides(tmp_path):
    """conf/model_method/micro_c_lora.yaml: 10x the paper-side rate on the micro world (docs/knobs.md
    section 5), the source's rate on every other model; a command's method.lr_lora wins."""
    assert compose_cfg(tmp_path, ["+experiment=seq7", "method=c_lora"]).method.lr_lora == 5e-5
    assert compose_cfg(tmp_path, ["+experiment=seq7", "method=c_lora", "method.lr_lora=1e-6"]).method.lr_lora == 1e-6
    assert compose_cfg(tmp_path, ["model=tiny", "method=c_lora"]).method.lr_lora == 5e-6
