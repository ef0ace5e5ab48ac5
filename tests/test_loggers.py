"""conf/logger/*.yaml + log_stage / finish_loggers, read back from what each logger wrote."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from PIL import Image

from cns_lightning.evaluation.loggers import (
    _wandb_records,
    build_loggers,
    find_wandb_run_files,
    finish_loggers,
    log_hyperparameters,
    log_stage,
    read_wandb_history,
)

CONF = Path(__file__).resolve().parents[1] / "src" / "cns_lightning" / "conf"


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return hydra_compose(config_name="config", overrides=overrides)


def stage_payload(stage: int):
    metrics = {"eval/clip_i/dog": 70.0 + stage, "eval/clip_t/dog": 60.0 - stage, "eval/forgetting/clip_i": math.nan if stage == 1 else 1.5}
    images = {"samples/grid": Image.new("RGB", (48, 24), (10 * stage, 100, 200))}
    tables = {"forgetting/clip_i": (["stage", "dog", "mug"], [[t, 70.0 + t, None if t == 1 else 80.0] for t in range(1, stage + 1)])}
    return metrics, images, tables


def test_logger_configs_resolve(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose(["logger=[csv,tensorboard,wandb]", f"paths.run_dir={tmp_path}", "name=exp", "seed=3"])
    assert list(cfg.logger) == ["csv", "tensorboard", "wandb"]
    w = cfg.logger.wandb
    assert (w.mode, w.group, w.name, w.save_dir) == ("offline", "exp", "cns/seed3", str(tmp_path))
    assert cfg.logger.csv.save_dir == str(tmp_path) and w.entity is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert compose(["logger=wandb", f"paths.run_dir={tmp_path}"]).logger.wandb.mode == "disabled"
    assert build_loggers(compose(["logger=none", f"paths.run_dir={tmp_path}"]).get("logger")) == []
    with pytest.raises(ValueError, match="no _target_"):
        build_loggers({"x": {"save_dir": "."}})


def test_log_stage_reaches_every_logger(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    cfg = compose(["logger=[csv,tensorboard,wandb]", f"paths.run_dir={run_dir}", "name=exp"])
    loggers = build_loggers(cfg.logger)
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger", "TensorBoardLogger", "WandbLogger"]
    for stage in (1, 2):
        log_stage(loggers, stage, *stage_payload(stage))
    finish_loggers(loggers)
    import wandb

    assert wandb.run is None

    # W&B: the offline run file's history holds the stage metrics, the image and the table.
    files = find_wandb_run_files(run_dir)
    assert len(files) == 1 and files[0].parent.name.startswith("offline-run-")
    rows = [r for r in read_wandb_history(files[0], wait_s=60) if "eval/clip_i/dog" in r]
    assert [(r["stage"], r["eval/clip_i/dog"], r["eval/clip_t/dog"]) for r in rows] == [(1, 71, 59), (2, 72, 58)]
    assert "eval/forgetting/clip_i" not in rows[0] and rows[1]["eval/forgetting/clip_i"] == 1.5
    assert rows[1]["samples/grid/_type"] == "image-file" and rows[1]["forgetting/clip_i/_type"] == "table-file"
    assert rows[1]["forgetting/clip_i/nrows"] == 2
    from wandb.proto import wandb_internal_pb2 as pb

    runs = [pb.Record.FromString(r).run for r in _wandb_records(files[0]) if pb.Record.FromString(r).WhichOneof("record_type") == "run"]
    assert runs[0].run_group == "exp" and runs[0].display_name == "cns/seed0"

    # TensorBoard: scalars at step = stage, the image, the table as text.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/clip_i/dog")] == [(1, 71.0), (2, 72.0)]
    assert [e.step for e in acc.Images("samples/grid")] == [1, 2]
    assert any(t.startswith("forgetting/clip_i") for t in acc.Tags()["tensors"])

    # CSV: one row per stage (with a stage column), media files per stage.
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["stage"], r["eval/clip_i/dog"]) for r in rows] == [("1.0", "71.0"), ("2.0", "72.0")]
    media = run_dir / "csv" / "media"
    assert (media / "samples_grid_stage02.png").exists()
    assert (media / "forgetting_clip_i_stage02.csv").read_text().splitlines() == ["stage,dog,mug", "1,71.0,", "2,72.0,80.0"]


def test_a_resumed_run_keeps_the_earlier_sessions_csv_rows(tmp_path):
    """A run folder reused by a resume or an extension: each session builds its own loggers;
    the CSV rows of the earlier session stay and the new ones follow (Lightning's own CSVLogger
    deletes metrics.csv when the second logger starts)."""
    cfg = compose(["logger=csv", f"paths.run_dir={tmp_path}"])
    first = build_loggers(cfg.logger)
    log_stage(first, 1, {"eval/clip_i/dog": 71.0})
    finish_loggers(first)
    second = build_loggers(cfg.logger)  # the resumed session
    log_stage(second, 2, {"eval/clip_i/dog": 72.0, "eval/clip_i/mug": 80.0})  # a new column too
    finish_loggers(second)
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["stage"], r["eval/clip_i/dog"], r["eval/clip_i/mug"]) for r in rows] == [("1.0", "71.0", ""), ("2.0", "72.0", "80.0")]


def test_each_multirun_job_gets_its_own_wandb_run(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for seed in (0, 1):  # two jobs of one multirun process, one after the other
        cfg = compose(["logger=wandb", f"paths.run_dir={tmp_path / f'seed{seed}'}", f"seed={seed}"])
        loggers = build_loggers(cfg.logger)
        log_stage(loggers, 1, {"eval/clip_i": float(seed)})
        finish_loggers(loggers)
    files = find_wandb_run_files(tmp_path)
    assert len(files) == 2 and files[0].name != files[1].name
    assert [read_wandb_history(f, wait_s=60)[0]["eval/clip_i"] for f in files] == [0, 1]


def test_every_logger_gets_the_resolved_config(monkeypatch, tmp_path):
    """log_hyperparameters: the W&B run config, TensorBoard hparams and CSV hparams.yaml hold the
    whole resolved run config; the W&B run name carries the sweep tag."""
    import yaml

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    cfg = compose(["logger=[csv,tensorboard,wandb]", f"paths.run_dir={run_dir}", "name=exp", "tag=_l1_10", "method.lambda1=10.0"])
    loggers = build_loggers(cfg.logger)
    sent = log_hyperparameters(loggers, cfg)
    assert sent["method"]["lambda1"] == 10.0 and sent["tag"] == "_l1_10" and "hydra" not in sent
    wb = loggers[2]
    assert wb.experiment.config["method"]["lambda1"] == 10.0 and wb.experiment.config["name"] == "exp"
    assert wb.experiment.name == "cns_l1_10/seed0"
    finish_loggers(loggers)
    for kind in ("csv", "tensorboard"):  # TensorBoard writes its hparams.yaml beside the events (no hp_metric)
        hp = yaml.safe_load((run_dir / kind / "hparams.yaml").read_text())
        assert hp["method"]["lambda1"] == 10.0 and hp["seed"] == 0, kind
