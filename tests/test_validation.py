"""cns_lightning.evaluation.validation: samples during a stage, through the CLI, read back from what
every logger wrote; the trained stages are bit-identical to a run without them."""

from __future__ import annotations

import hashlib

from PIL import Image

from conftest import FAST, concepts_override, run_cli
from cns_lightning.evaluation.loggers import find_wandb_run_files, read_wandb_history

STAGE_FILES = ("kv.safetensors", "masks.safetensors", "token.safetensors")


def _stage_hashes(run) -> dict[str, str]:
    return {f"{s.name}/{f}": hashlib.sha256((s / f).read_bytes()).hexdigest() for s in sorted((run / "stages").iterdir()) for f in STAGE_FILES}


def test_validation_samples_reach_every_logger_and_change_no_weight(tmp_path, concept_dirs, env):
    env = dict(env, WANDB_DIR=str(tmp_path / "wandb_dir"), WANDB_SILENT="true")
    base = [concepts_override(concept_dirs[:2]), *FAST]
    on = ["logger=[csv,tensorboard,wandb]", "validation.every_n_steps=3", "validation.num_images=2", "validation.num_inference_steps=2",
          "validation.prompts=['a {token} {class} on the beach','a {token} {class}']", "tag=_val"]
    run_cli([*base, *on], env)
    run = tmp_path / "out" / "default" / "cns_val" / "seed0"

    # steps 3 and 4 (the last) of each 4-step stage; the run's global step goes on across stages
    media = run / "csv" / "media"
    want = [f"validation_{c}_p{j}_step{s:06d}.png" for c, steps in (("teddy", (3, 4)), ("mug", (7, 8))) for s in steps for j in (0, 1)]
    assert sorted(p.name for p in media.glob("validation_*.png")) == sorted(want)
    with Image.open(media / "validation_teddy_p0_step000003.png") as im:
        assert im.size == (2 * 32, 32)  # two samples in a row, at data.resolution

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("validation/teddy/p0")] == [3, 4]
    assert [e.step for e in acc.Images("validation/mug/p1")] == [7, 8]

    (wb,) = find_wandb_run_files(run)
    rows = [r for r in read_wandb_history(wb, wait_s=60) if "validation/mug/p0/_type" in r]
    assert [r["trainer/global_step"] for r in rows] == [7, 8]
    assert rows[0]["validation/mug/p0/_type"] == "images/separated" and rows[0]["validation/mug/p0/width"] == 64
    assert rows[0]["validation/mug/p0/captions"] == ["a <new2> mug on the beach"]

    # the same run without samples trains bit-identical stages
    run_cli([*base, "tag=_plain"], env)
    assert _stage_hashes(run) == _stage_hashes(tmp_path / "out" / "default" / "cns_plain" / "seed0")


def test_a_bad_validation_value_fails_before_training(tmp_path, concept_dirs, env):
    proc = run_cli([concepts_override(concept_dirs[:1]), *FAST, "validation.every_n_steps=-2"], env, check=False)
    assert proc.returncode == 1 and "validation.every_n_steps=-2 (int): expected a whole number >= 0" in proc.stderr
    assert not (tmp_path / "out" / "default" / "cns" / "seed0" / "stages").exists()
