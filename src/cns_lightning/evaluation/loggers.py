"""Lightning loggers from ``src/cns_lightning/conf/logger/*.yaml``, and per-stage logging of evaluation results.

* :class:`CSVLogger` - Lightning's CSVLogger that keeps a reused run folder's earlier rows
  (Lightning's deletes ``metrics.csv`` when a new logger starts in the folder).
* :func:`build_loggers` - instantiate the ``logger`` config group (a dict of Lightning logger
  configs, possibly empty) into a list of Lightning loggers. W&B runs offline unless
  ``WANDB_MODE`` says otherwise (the yaml reads ``${oc.env:WANDB_MODE,offline}``).
* :func:`log_hyperparameters` - the resolved run config to every logger (W&B config, TensorBoard
  hparams, CSV ``hparams.yaml``).
* :func:`log_stage` - one stage's metrics (x axis = stage), forgetting matrices as tables, sample
  grids as images, to every logger in its own idiom (W&B tables/images, TensorBoard
  scalars/images/text, CSV rows + files).
* :func:`finish_loggers` - flush and close every logger; ends the W&B run so that the next job of a
  Hydra multirun (same process) starts its own run.
* :func:`read_wandb_history` - read the history rows of an offline run file (``run-*.wandb``)
  without network or ``wandb sync`` (wandb >= 0.20 ships no Python reader for it).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from PIL import Image

Table = tuple[list[str], list[list[Any]]]


# ----------------------------------------------------------------------------- building
class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is kept: its header is read
    and new rows are appended under it (widened when new columns arrive, as Lightning does within
    one session)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class CSVLogger(LightningCSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` for run folders that are resumed or extended: the rows
    of earlier sessions stay in ``csv/metrics.csv`` and the new stages' rows follow them (Lightning's
    own logger deletes the file when a new logger starts in the same folder)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _KeepingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment


def _logger_entries(cfg: Any, resolve: bool) -> list[tuple[Any, Any]]:
    """(key, entry) of a ``logger`` config: a dict of configs by name, a list by index, None: none."""
    if cfg is None:
        return []
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=resolve)
    return list(cfg.items()) if isinstance(cfg, Mapping) else list(enumerate(cfg))


def build_loggers(cfg: Any) -> list:
    """Instantiate a ``logger`` config: None/{} -> [], a dict of configs or a list of configs -> loggers."""
    from hydra.utils import instantiate

    loggers = []
    for i, (_, item) in enumerate(_logger_entries(cfg, resolve=True)):
        if not item:
            continue
        if not isinstance(item, Mapping) or "_target_" not in item:
            raise ValueError(
                f"logger config entry {i} ({item!r}) has no _target_; each entry must be a Lightning logger config, "
                "e.g. {_target_: lightning.pytorch.loggers.CSVLogger, save_dir: ...} (see src/cns_lightning/conf/logger/)"
            )
        if item["_target_"].endswith("WandbLogger"):
            os.environ.setdefault("WANDB_MODE", "offline")
            Path(item.get("save_dir") or ".").mkdir(parents=True, exist_ok=True)
        loggers.append(instantiate(item))
    return loggers


def check_logger_targets(cfg: Any) -> None:
    """Every ``logger`` entry's ``_target_`` imports, before the run writes anything (a logger is
    built only after the model loads, so a typo there would fail late, beside a started run folder)."""
    from hydra.utils import get_class

    from ..preflight import ConfigValueError

    hydra_log = logging.getLogger("hydra.utils")  # get_class logs its failure as an ERROR into the run's log file
    for key, item in _logger_entries(cfg, resolve=False):
        target = item.get("_target_") if isinstance(item, Mapping) else None
        if not target:
            continue
        was, hydra_log.disabled = hydra_log.disabled, True
        try:
            get_class(target)
        except Exception as e:  # hydra wraps ImportError / AttributeError alike
            raise ConfigValueError(
                f"logger.{key}._target_={target!r} cannot be imported ({str(e).splitlines()[0]}). Fix: a Lightning logger "
                "class, e.g. cns_lightning.evaluation.loggers.CSVLogger, lightning.pytorch.loggers.TensorBoardLogger or "
                "lightning.pytorch.loggers.WandbLogger (src/cns_lightning/conf/logger/), or logger=none for no logger."
            ) from None
        finally:
            hydra_log.disabled = was


def log_hyperparameters(loggers: Iterable, cfg: Any) -> dict:
    """Send the run's whole resolved config to every logger, as lightning-hydra-template's
    ``log_hyperparameters`` does: the W&B run's config, TensorBoard's hparams, the CSV logger's
    ``hparams.yaml``. Returns the dict that was sent (the ``hydra`` node left out)."""
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    params.pop("hydra", None)
    for logger in loggers:
        logger.log_hyperparams(params)
    return params


# ----------------------------------------------------------------------------- logging
def _kind(logger) -> str:
    name = type(logger).__name__
    if name == "WandbLogger":
        return "wandb"
    if name == "TensorBoardLogger":
        return "tensorboard"
    if name == "CSVLogger":
        return "csv"
    return "other"


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if not math.isnan(v) and not math.isinf(v):
            out[k] = v
    return out


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", key).strip("_")


def md_table(columns: list[str], rows: list[list[Any]]) -> str:
    def cell(v):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.2f}" if isinstance(v, float) else str(v))

    head = "| " + " | ".join(map(str, columns)) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(cell(v) for v in r) + " |\n" for r in rows)


def log_stage(
    loggers: Iterable,
    stage: int,
    metrics: Mapping[str, float],
    images: Mapping[str, Image.Image] | None = None,
    tables: Mapping[str, Table] | None = None,
) -> None:
    """Log one evaluated stage to every logger; the x axis is ``stage`` (not the trainer step).

    NaN metrics (e.g. forgetting before stage 2) are dropped. W&B: one ``run.log`` with the metrics,
    ``wandb.Image`` per image and ``wandb.Table`` per table, all keyed on the ``stage`` metric
    (``define_metric``), so Lightning's own ``trainer/global_step`` axis is left alone.
    TensorBoard: ``add_scalar``/``add_image``/``add_text`` at global_step = stage. CSV:
    ``log_metrics`` (with a ``stage`` column) plus PNG and CSV files under ``<log_dir>/media``.
    """
    images, tables = dict(images or {}), dict(tables or {})
    values = _finite(metrics)
    for logger in loggers:
        kind = _kind(logger)
        if kind == "wandb":
            _log_wandb(logger, stage, values, images, tables)
        elif kind == "tensorboard":
            w = logger.experiment
            for k, v in values.items():
                w.add_scalar(k, v, global_step=stage)
            for k, im in images.items():
                w.add_image(k, np.asarray(im.convert("RGB")), global_step=stage, dataformats="HWC")
            for k, (cols, rows) in tables.items():
                w.add_text(k, md_table(cols, rows), global_step=stage)
            w.flush()
        else:
            logger.log_metrics({**values, "stage": float(stage)}, step=stage)
            log_dir = getattr(logger, "log_dir", None)
            if kind == "csv" and log_dir:
                media = Path(log_dir) / "media"
                media.mkdir(parents=True, exist_ok=True)
                for k, im in images.items():
                    im.save(media / f"{_safe(k)}_stage{stage:02d}.png")
                for k, (cols, rows) in tables.items():
                    with open(media / f"{_safe(k)}_stage{stage:02d}.csv", "w", newline="") as f:
                        wr = csv.writer(f)
                        wr.writerow(cols)
                        wr.writerows(rows)
            if hasattr(logger, "save"):
                logger.save()


def log_images(loggers: Iterable, step: int, images: Mapping[str, Image.Image], captions: Mapping[str, str] | None = None) -> None:
    """Log images at a training step to every logger (validation samples during a stage).

    W&B: ``WandbLogger.log_image`` (on Lightning's ``trainer/global_step`` axis, with the caption).
    TensorBoard: ``add_image`` at ``global_step=step``. CSV (and loggers with a ``log_dir``): PNG
    files ``<log_dir>/media/<key>_step<step>.png``.
    """
    captions = dict(captions or {})
    for logger in loggers:
        kind = _kind(logger)
        for k, im in images.items():
            if kind == "wandb":
                logger.log_image(key=k, images=[im], step=step, caption=[captions.get(k, k)])
            elif kind == "tensorboard":
                logger.experiment.add_image(k, np.asarray(im.convert("RGB")), global_step=step, dataformats="HWC")
            elif getattr(logger, "log_dir", None):
                media = Path(logger.log_dir) / "media"
                media.mkdir(parents=True, exist_ok=True)
                im.save(media / f"{_safe(k)}_step{step:06d}.png")
        if kind == "tensorboard":
            logger.experiment.flush()


def _log_wandb(logger, stage: int, values: dict, images: dict, tables: dict) -> None:
    import wandb

    run = logger.experiment
    payload: dict[str, Any] = dict(values)
    for k, im in images.items():
        payload[k] = wandb.Image(im, caption=f"stage {stage}")
    for k, (cols, rows) in tables.items():
        payload[k] = wandb.Table(columns=[str(c) for c in cols], data=[list(r) for r in rows])
    run.define_metric("stage")
    for k in payload:
        run.define_metric(k, step_metric="stage")
    payload["stage"] = stage
    run.log(payload)


def finish_loggers(loggers: Iterable, status: str = "success") -> None:
    """Finalize every logger and end the W&B run (each multirun job then gets its own run)."""
    ended_wandb = False
    for logger in loggers:
        if _kind(logger) == "wandb":
            exp = getattr(logger, "_experiment", None)
            if exp is not None:
                exp.finish(exit_code=0 if status == "success" else 1)
                logger._experiment = None
                ended_wandb = True
        else:
            logger.finalize(status)
    if ended_wandb:
        import wandb

        if wandb.run is not None:
            wandb.finish()


# ----------------------------------------------------------------------------- offline W&B files
_BLOCK = 32768
_HEADER = 7  # b":W&B" + 2-byte magic + 1-byte version
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path) -> Iterable[bytes]:
    """Records of a W&B transaction log (LevelDB log format: 32 KiB blocks of checksummed chunks)."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (expected the ':W&B' header)")
    pos, buf = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            buf = chunk
        elif kind == _MIDDLE:
            buf += chunk
        elif kind == _LAST:
            yield buf + chunk
            buf = b""
        elif kind == 0 and length == 0:  # zero padding at the end
            break


def _wandb_record_list(path: Path, wait_s: float):
    """Parsed records; with ``wait_s`` > 0, wait until the run's exit record is on disk.

    ``run.finish()`` returns before wandb's service has necessarily flushed the file's tail, so a
    reader right after it may see a truncated file for a moment.
    """
    import time

    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + wait_s
    while True:
        recs = []
        for raw in _wandb_records(path):
            rec = pb.Record()
            rec.ParseFromString(raw)
            recs.append(rec)
        if wait_s <= 0 or any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.2)


def read_wandb_history(path: Path, wait_s: float = 0.0) -> list[dict[str, Any]]:
    """History rows (``run.log`` calls) of an offline run file ``run-<id>.wandb``, values JSON-decoded.

    ``wait_s``: wait up to this long for the finished run's last records to reach the disk.
    """
    import json

    rows = []
    for rec in _wandb_record_list(path, wait_s):
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            try:
                row[key] = json.loads(item.value_json)
            except json.JSONDecodeError:
                row[key] = item.value_json
        rows.append(row)
    return rows


def find_wandb_run_files(root: Path) -> list[Path]:
    """Every ``run-*.wandb`` below ``root`` (offline runs live in ``<save_dir>/wandb/offline-run-*``)."""
    return sorted(Path(root).rglob("run-*.wandb"))


__all__ = ["build_loggers", "log_stage", "finish_loggers", "read_wandb_history", "find_wandb_run_files"]
