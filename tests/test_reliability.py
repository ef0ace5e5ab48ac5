"""Bad input, non-finite losses, damaged checkpoints, disk space and GPU OOM, end to end.

Through the real CLI (exit code, stderr) where the exit code matters, else through the real loop
``continual.run`` with a config composed exactly as the CLI composes it (no Python start-up per
case). ``tests/test_images.py`` covers the decoding itself; here: the run fails early, the message
names the file or field and the fix, and nothing a rerun would trust is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cns_lightning import continual
from cns_lightning.concepts import ConceptError
from cns_lightning.images import ImageInputError
from cns_lightning.module import ContinualModule
from cns_lightning.preflight import ConfigValueError, output_bytes
from conftest import CONF, FAST, ROOT, compose_cfg, concepts_override, make_concept_folder, run_cli

FAST_INPROC = [*FAST, "~logger"]



def stage_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "stages").iterdir()) if (run / "stages").is_dir() else []


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ bad concept folders and images
def _missing(d: Path) -> Path:
    return d / "nope"


def _empty(d: Path) -> Path:
    (d / "empty").mkdir()
    (d / "empty" / "notes.txt").write_text("no images here")
    return d / "empty"


def _with(d: Path, name: str, data: bytes | None = None, image: Image.Image | None = None) -> Path:
    f = make_concept_folder(d / "c", n=2)
    if image is not None:
        image.save(f / name)
    else:
        (f / name).write_bytes(data)
    return f


def _truncated(d: Path) -> Path:
    f = make_concept_folder(d / "c", n=2)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(f / "t.jpg", quality=90)
    data = (f / "t.jpg").read_bytes()
    (f / "t.jpg").write_bytes(data[: len(data) // 2])
    return f


def _captions_mismatch(d: Path) -> Path:
    f = make_concept_folder(d / "c", n=3)
    (f / "00.txt").write_text("a photo of a teddy bear")
    return f


def _jsonl_unknown_file(d: Path) -> Path:
    f = make_concept_folder(d / "c", n=2)
    rows = [{"file_name": "00.png", "text": "a"}, {"file_name": "01.png", "text": "b"}, {"file_name": "07.png", "text": "c"}]
    (f / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return f


def _link(d: Path, name: str, target: str) -> Path:
    f = make_concept_folder(d / "c", n=2)
    (f / name).symlink_to(f / target)
    return f


BAD_FOLDERS = {
    "missing folder": (_missing, "nope: concept folder does not exist"),
    "empty folder": (_empty, "holds no image files"),
    "not an image": (lambda d: _with(d, "02.png", b"this is text, not a PNG"), "02.png: is not an image Pillow can read"),
    "zero bytes": (lambda d: _with(d, "02.jpg", b""), "02.jpg: image file is empty (0 bytes)"),
    "truncated": (_truncated, "t.jpg: image is truncated or corrupt"),
    "far too small": (lambda d: _with(d, "02.png", image=Image.new("RGB", (4, 6))), "02.png: image is 4x6, its short side 4 px is below the required 8 px"),
    "captions do not match": (_captions_mismatch, "1 of 3 images have a caption .txt file but 01.png, 02.png do not"),
    "jsonl names a missing file": (_jsonl_unknown_file, "names 07.png, which does not exist"),
    "dangling symlink": (lambda d: _link(d, "02.png", "moved.png"), "02.png: is a symbolic link to"),
    "symlink loop": (lambda d: _link(d, "02.png", "02.png"), "02.png: is a symbolic link loop"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_concept_folder_fails_before_anything_is_written(tmp_path, case):
    make, expected = BAD_FOLDERS[case]
    folder = make(tmp_path)
    cfg = compose_cfg(tmp_path, [concepts_override([folder]), *FAST_INPROC])
    with pytest.raises(ImageInputError) as e:
        continual.run(cfg)
    assert expected in str(e.value) and "Fix:" in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists(), "a run folder was written for bad input"


def test_bad_input_through_the_cli_exits_nonzero_naming_the_file(tmp_path, env):
    good = make_concept_folder(tmp_path / "data" / "teddy", n=2)
    bad = _with(tmp_path / "data2", "02.png", b"GIF89a? not really")
    proc = run_cli([concepts_override([good, bad]), *FAST], env, check=False)
    assert proc.returncode == 1
    assert f"{bad / '02.png'}: is not an image Pillow can read. Fix: replace it with a valid image file" in proc.stderr
    assert not (tmp_path / "out" / "default" / "cns" / "seed0" / "stages").exists()
    assert not (tmp_path / "out" / "default" / "cns" / "seed0" / "run_identity.json").exists()


# ------------------------------------------------------------------ awkward images are repaired
def _awkward_folder(folder: Path) -> Path:
    """Every image mode a phone, scanner or editor produces, each with its documented repair."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("L").save(folder / "grey.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png", transparency=0)
    Image.fromarray((rng.integers(0, 65536, (40, 40))).astype(np.uint16)).save(folder / "deep16.png")
    Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (48, 64), dtype=np.uint8)]), "RGBA").save(folder / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    frames = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    Image.fromarray(rgb).resize((4000, 3000)).save(folder / "large.jpg", quality=80)  # 12 MP, decoded at 1/64
    Image.fromarray(rgb).resize((16, 16)).save(folder / "small.png")  # below 32 px: upscaled, with a warning
    # the same modes at >= 2x the resolution: converted to RGB, then reduced while loading
    Image.fromarray(rgb).resize((96, 72)).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette_large.png")
    Image.fromarray(rng.integers(0, 65536, (80, 80)).astype(np.uint16)).save(folder / "deep16_large.png")
    big = [Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)) for _ in range(2)]
    big[0].save(folder / "animated_large.gif", save_all=True, append_images=big[1:], duration=50)
    return folder


def test_awkward_images_are_converted_and_the_run_succeeds(tmp_path, env):
    folder = _awkward_folder(tmp_path / "data" / "teddy")
    proc = run_cli([concepts_override([folder]), *FAST, "method.steps=2"], env)
    run = tmp_path / "out" / "default" / "cns" / "seed0"
    assert stage_names(run) == ["01_teddy"]
    assert f"{folder / 'animated.gif'}: animated (multi-frame) image with 3 frames; only the first frame is used" in proc.stderr
    assert f"{folder / 'small.png'}: image is 16x16, smaller than data.resolution=32; it is upscaled" in proc.stderr
    # the disk estimate is an upper bound of what a stage really takes
    stage = run / "stages" / "01_teddy"
    used = sum(p.stat().st_size for p in stage.iterdir())
    from cns_lightning.models import build_random_pipeline, cross_attention_kv

    pipe = build_random_pipeline("tiny")
    numel = sum(p.numel() for p in cross_attention_kv(pipe.unet).values())
    assert used <= output_bytes(numel, 32, 1, 0, 32)["per_stage"]


# ------------------------------------------------------------------ tokens and config values
@pytest.mark.parametrize(
    "tokens, expected",
    [
        (["dog"], "data.concepts[0].token='dog' is already in the tokenizer's vocabulary"),
        (["sks"], "data.concepts[0].token='sks' is already in the tokenizer's vocabulary (as 'sks</w>')"),
        (["<new1>", "<new1>"], "data.concepts[1].token='<new1>' is used twice (also data.concepts[0])"),
        (["<new1>", "<NEW1>"], "in a caption the tokenizer does not read it as its own new token"),
        (["my token"], "data.concepts[0].token='my token' holds whitespace"),
    ],
)
def test_bad_modifier_tokens(tmp_path, tokens, expected):
    dirs = [make_concept_folder(tmp_path / "data" / f"c{i}", n=2, seed=i) for i in range(len(tokens))]
    items = [f"{{name:c{i},class_name:thing,path:'{d}',token:'{t}'}}" for i, (d, t) in enumerate(zip(dirs, tokens))]
    cfg = compose_cfg(tmp_path, ["data.concepts=[" + ",".join(items) + "]", *FAST_INPROC])
    with pytest.raises(ConceptError) as e:
        continual.run(cfg)
    assert expected in str(e.value), str(e.value)
    assert stage_names(tmp_path / "run") == []


@pytest.mark.parametrize(
    "override, expected",
    [
        ("method.steps=abc", "method.steps='abc' (str): expected a whole number >= 1"),
        ("method.steps=2.5", "method.steps=2.5 (float): expected a whole number >= 1"),
        ("data.batch_size=0", "data.batch_size=0 (int): expected a whole number >= 1"),
        ("method.lr_neurons=-1", "method.lr_neurons=-1 (int): expected a finite number >= 0"),
        ("data.flip_p=2", "data.flip_p=2 (int): expected a finite number in [0, 1]"),
        ("data.cache_latents=maybe", "data.cache_latents='maybe' (str): expected true or false"),
        ("model.kv_lr_scale=abc", "model.kv_lr_scale='abc' (str): expected a finite number >= 0"),
        ("trainer=ddp_compact trainer.strategy.sigterm_check_every_n_steps=0",
         "trainer.strategy.sigterm_check_every_n_steps=0 (int): expected a whole number >= 1"),
    ],
)
def test_config_values_of_the_wrong_type(tmp_path, concept_dirs, override, expected):
    cfg = compose_cfg(tmp_path, [concepts_override(concept_dirs[:1]), *FAST_INPROC, *override.split()])
    with pytest.raises(ConfigValueError) as e:
        continual.run(cfg)
    assert expected in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists()


def test_wrong_type_through_the_cli(tmp_path, concept_dirs, env):
    proc = run_cli([concepts_override(concept_dirs[:1]), "method.steps=abc"], env, check=False)
    assert proc.returncode == 1 and "method.steps='abc' (str): expected a whole number >= 1" in proc.stderr
    # a key that does not exist is Hydra's error, naming the key (more in test_continual.py)
    proc = run_cli([concepts_override(concept_dirs[:1]), "method.stepz=3"], env, check=False)
    assert proc.returncode == 1 and "stepz" in proc.stderr


# ------------------------------------------------------------------ model folders
def test_model_folder_missing_or_not_stable_diffusion(tmp_path, concept_dirs):
    from diffusers import UNet2DConditionModel

    from cns_lightning.models import build_random_pipeline

    over = [concepts_override(concept_dirs[:1]), *FAST_INPROC, "model=sd15", "data.resolution=32"]
    with pytest.raises(Exception) as e:
        continual.run(compose_cfg(tmp_path, [*over, f"model.path={tmp_path / 'no_model'}"]))
    assert "no diffusers pipeline folder there" in str(e.value) and "model_index.json" in str(e.value)

    # a diffusers pipeline folder whose UNet has no cross-attention
    pipe = build_random_pipeline("tiny")
    pipe.unet = UNet2DConditionModel(
        sample_size=4, block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None, cross_attention_dim=32, norm_num_groups=8,
    )
    pipe.save_pretrained(tmp_path / "plain_unet")
    with pytest.raises(Exception) as e:
        continual.run(compose_cfg(tmp_path, [*over, f"model.path={tmp_path / 'plain_unet'}"]))
    assert "the UNet has no cross-attention" in str(e.value) and str(tmp_path / "plain_unet") in str(e.value)
    assert stage_names(tmp_path / "run") == []


# ------------------------------------------------------------------ non-finite loss
def test_nan_loss_keeps_the_last_good_stage_and_resumes_with_changes(tmp_path, concept_dirs, env):
    """lambda2 = 1e39 is inf in fp32: L_reg (Eq. 7) exists from stage 2 on, so stage 1 trains
    and stage 2's loss is not finite. Then: the same run, continued with a sane lambda2."""
    base = [concepts_override(concept_dirs[:2]), *FAST]
    run = tmp_path / "out" / "default" / "cns" / "seed0"
    proc = run_cli([*base, "method.lambda2=1e39"], env, check=False)
    assert proc.returncode == 1
    assert "training loss became" in proc.stderr and "of concept 'c02'" in proc.stderr
    assert "Stages 1-1 are saved and intact" in proc.stderr and "stage 2 was not saved" in proc.stderr
    assert stage_names(run) == ["01_teddy"]
    assert "stopped at stage 2" in json.loads((run / "summary.json").read_text())["status"]
    stage1 = {p.name: (p.stat().st_mtime_ns, _sha(p)) for p in (run / "stages" / "01_teddy").iterdir()}

    # a changed training setting is refused without the opt-in, which the message names ...
    proc = run_cli([*base, "method.lambda2=1.0"], env, check=False)
    assert proc.returncode == 1 and "method.lambda2 differ" in proc.stderr and "+resume_with_changes=true" in proc.stderr
    # ... and with it stage 1 is kept (not retrained) and stage 2 trains with the new value
    proc = run_cli([*base, "method.lambda2=1.0", "+resume_with_changes=true"], env)
    assert "resuming" in proc.stdout + proc.stderr
    assert stage_names(run) == ["01_teddy", "02_mug"]
    assert {p.name: (p.stat().st_mtime_ns, _sha(p)) for p in (run / "stages" / "01_teddy").iterdir()} == stage1
    identity = json.loads((run / "run_identity.json").read_text())
    assert identity["_changes"] == [{"method.lambda2": [1e39, 1.0]}]


def test_huge_learning_rate_stops_at_stage_one(tmp_path, concept_dirs):
    cfg = compose_cfg(tmp_path, [concepts_override(concept_dirs[:1]), *FAST_INPROC, "method.lr_neurons=1e30", "method.lr_token=1e30", "method.steps=6"])
    with pytest.raises(continual.RunError) as e:
        continual.run(cfg)
    assert "training loss became" in str(e.value) and "lower method.lr_neurons / method.lr_token" in str(e.value)
    assert stage_names(tmp_path / "run") == []


# ------------------------------------------------------------------ damaged checkpoints
def test_damaged_last_stage_falls_back_and_retrains(tmp_path, concept_dirs, env):
    args = [concepts_override(concept_dirs[:2]), *FAST]
    run_cli(args, env)
    run = tmp_path / "out" / "default" / "cns" / "seed0"
    s1, s2 = run / "stages" / "01_teddy", run / "stages" / "02_mug"
    good = {f: (s2 / f).read_bytes() for f in ("kv.safetensors", "masks.safetensors", "token.safetensors")}
    mtime1 = (s1 / "manifest.json").stat().st_mtime_ns

    for damage in ("truncate", "flip"):
        path = s2 / ("kv.safetensors" if damage == "truncate" else "token.safetensors")
        data = bytearray(path.read_bytes())
        if damage == "truncate":
            del data[len(data) // 2 :]
        else:
            data[-1] ^= 0x01
        path.write_bytes(bytes(data))
        proc = run_cli(args, env)
        out = proc.stdout + proc.stderr
        assert f"{path}: file was modified or damaged after the stage completed" in out, out[-3000:]
        assert "Falling back to the last good stage (1); stages from 2 on are retrained" in out
        assert "resuming" in out and "stages 1-1 complete" in out
        assert (s1 / "manifest.json").stat().st_mtime_ns == mtime1, "the good stage was retrained"
        assert {f: (s2 / f).read_bytes() for f in good} == good, "the retrained stage differs from the original"


def test_no_unpickling_in_the_package():
    """Run folders are read through safetensors and JSON only: no torch.load / pickle anywhere."""
    src = ROOT / "src" / "cns_lightning"
    hits = []
    for py in src.rglob("*.py"):
        text = py.read_text(encoding="utf-8")
        for needle in ("torch.load(", "pickle.load", "import pickle", "cPickle", "joblib.load"):
            if needle in text and not (needle == "torch.load(" and all("weights_only=True" in line for line in text.splitlines() if needle in line)):
                hits.append(f"{py.relative_to(ROOT)}: {needle}")
    assert not hits, hits


# ------------------------------------------------------------------ resources
def test_not_enough_disk_stops_before_the_run(tmp_path, concept_dirs, env):
    proc = run_cli([concepts_override(concept_dirs[:2]), *FAST, "++min_free_bytes=1000000000000000000"], env, check=False)
    assert proc.returncode == 1
    assert "not enough disk space" in proc.stderr and "Estimate: 2 stages x" in proc.stderr and "Nothing was trained" in proc.stderr
    assert "hydra.run.dir" in proc.stderr  # the fix: another disk
    assert "paths.cache_dir=/path or CNS_CACHE=/path" in proc.stderr  # the cache (prior images) is on that disk too
    assert "Traceback" not in proc.stderr
    assert stage_names(tmp_path / "out" / "default" / "cns" / "seed0") == []
    assert not (tmp_path / "cache" / "priors").exists(), "prior images were generated although the disk is full"


def test_disk_estimate_counts_what_is_left(tmp_path, concept_dirs, monkeypatch):
    """The check measures the real free space (shutil.disk_usage); here the disk is made to look
    just too small for the run's stages, then just big enough."""
    import shutil as _shutil

    from cns_lightning.models import build_random_pipeline, cross_attention_kv

    pipe = build_random_pipeline("tiny")
    numel = sum(p.numel() for p in cross_attention_kv(pipe.unet).values())
    need = output_bytes(numel, 32, 1, 2, 32)
    total = need["stages"] + need["priors"]
    real = _shutil.disk_usage
    for free, fails in ((total - 1, True), (total + 10**6, False)):
        monkeypatch.setattr(_shutil, "disk_usage", lambda p, free=free: real(p)._replace(free=free))
        cfg = compose_cfg(tmp_path / ("a" if fails else "b"), [concepts_override(concept_dirs[:1]), *FAST_INPROC, "method.steps=1"])
        if fails:
            with pytest.raises(continual.RunError, match="not enough disk space"):
                continual.run(cfg)
        else:
            continual.run(cfg)


@pytest.mark.parametrize("where", ["prior", "fit"])
def test_gpu_out_of_memory_names_the_knobs(tmp_path, concept_dirs, monkeypatch, where):
    """torch raises OutOfMemoryError from inside a CUDA op; here it is raised from the first
    training step / the prior sampler (the loop's handling is what is tested)."""

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    if where == "fit":
        monkeypatch.setattr(ContinualModule, "training_step", oom)
    else:
        monkeypatch.setattr("diffusers.StableDiffusionPipeline.__call__", oom)
    cfg = compose_cfg(tmp_path, [concepts_override(concept_dirs[:1]), *FAST_INPROC, "method.steps=1"])
    with pytest.raises(continual.RunError) as e:
        continual.run(cfg)
    msg = str(e.value)
    assert "the GPU ran out of memory during " + ("training of stage 1" if where == "fit" else "prior-image generation") in msg
    for knob in ("data.batch_size", "prior.batch_size", "trainer.precision=bf16-mixed", "model.resolution"):
        assert knob in msg, msg
    assert stage_names(tmp_path / "run") == []


def test_a_stage_stopped_early_is_not_saved_as_complete(tmp_path, concept_dirs):
    """Lightning returns normally when something stops training early (here max_time): the loop
    must not save that half-trained stage as complete, or a rerun would trust it."""
    cfg = compose_cfg(tmp_path, [concepts_override(concept_dirs[:1]), *FAST_INPROC, "method.steps=50", "++trainer.max_time=00:00:00:00"])
    with pytest.raises(continual.RunError, match=r"stopped after \d+ of method.steps=50 steps, so it was not saved"):
        continual.run(cfg)
    assert stage_names(tmp_path / "run") == []


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_experiment_composes_with_every_model(tmp_path, experiment, model):
    """`+experiment=X model=Y` resolves for every pair (seq7 read ${model.guidance_scale}, which
    only the micro model had: `+experiment=seq7 model=sd15_random` failed on its first GPU run)."""
    import cns_lightning.__main__  # noqa: F401  (registers the ${micro_asset:...} resolver)
    from omegaconf import OmegaConf

    cfg = compose_cfg(tmp_path, [f"+experiment={experiment}", f"model={model}"])
    for key in ("model", "data", "method", "prior", "eval", "calibration", "trainer"):
        OmegaConf.to_container(cfg[key], resolve=True)


def test_modifier_token_beyond_77_positions_is_an_error(tmp_path):
    folder = make_concept_folder(tmp_path / "data" / "long", n=2, seed=0, captions=["a photo of a {token} teddy bear"])
    long_caption = " ".join(["very"] * 80) + " {token} teddy bear"
    (folder / "01.txt").write_text(long_caption)
    cfg = compose_cfg(tmp_path, [f"data.concepts=[{{name:long,class_name:'teddy bear',path:'{folder}'}}]", *FAST_INPROC])
    with pytest.raises(ConceptError) as e:
        continual.run(cfg)
    msg = str(e.value)
    assert "01.png" in msg and "'<new1>' is text token 81 of 83, past the 75" in msg and "shorten that caption" in msg, msg
    assert stage_names(tmp_path / "run") == []
    (folder / "01.txt").write_text(" ".join(["very"] * 70) + " {token} teddy bear")  # token at 71: read
    continual.run(compose_cfg(tmp_path, [f"data.concepts=[{{name:long,class_name:'teddy bear',path:'{folder}'}}]", *FAST_INPROC]))
    assert stage_names(tmp_path / "run") == ["01_long"]


def test_a_folder_made_before_new_knobs_existed_still_resumes(tmp_path, concept_dirs):
    """run_identity.json written before model.guidance_scale / prior.precision / prior.compile
    existed: the run resumes (the new knobs take their current values); other changes still refuse."""
    overrides = [concepts_override(concept_dirs[:2]), *FAST_INPROC]
    continual.run(compose_cfg(tmp_path, overrides))
    run = tmp_path / "run"
    kv1 = _sha(run / "stages" / "01_teddy" / "kv.safetensors")
    identity = json.loads((run / "run_identity.json").read_text())
    del identity["model"]["guidance_scale"], identity["prior"]["precision"], identity["prior"]["compile"]
    (run / "run_identity.json").write_text(json.dumps(identity))
    shutil.rmtree(run / "stages" / "02_mug")
    continual.run(compose_cfg(tmp_path, overrides))
    assert stage_names(run) == ["01_teddy", "02_mug"] and _sha(run / "stages" / "01_teddy" / "kv.safetensors") == kv1
    assert json.loads((run / "run_identity.json").read_text())["prior"]["precision"] == "bf16"
    with pytest.raises(continual.RunError, match="prior.compile differ"):
        continual.run(compose_cfg(tmp_path, [*overrides, "prior.compile=true"]))
