"""Checks a run makes before it writes anything: config values, concept inputs, disk space.

* :func:`check_config_values` - every declared knob (``knobs.py``: the run's, and the method's own
  from its class) has the right type and range, and ``method`` holds no key its method does not
  declare (``method.steps=abc`` fails here, naming the field, not deep inside the Trainer).
* :func:`check_concept_inputs` - every concept folder exists and holds images, every image
  decodes (after the repairs :func:`cns_lightning.images.load_image` documents), captions match
  the images. Images smaller than the training resolution are upscaled, with a warning.
* :func:`check_device` - ``device`` names a device this machine has.
* :func:`output_bytes` / :func:`check_disk_space` - an upper bound of what the run writes (stage
  folders and prior images) against the free space, before any stage starts.
* :func:`oom_message` - what to lower when the GPU runs out of memory.

Each problem raises an error whose message names the field or file and the fix.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

from omegaconf import DictConfig

from .checkpoint import disk_free_check
from .concepts import Concept
from .images import load_image
from .knobs import Knob, knobs_of
from .methods import MethodConfigError, method_class

__all__ = ["ConfigValueError", "check_concept_inputs", "check_config_values", "check_device", "check_disk_space", "oom_message", "output_bytes"]


class ConfigValueError(ValueError):
    """A config value of the wrong type or out of range; the message names the key and the fix."""


def _lookup(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        if node is None or isinstance(node, str) or part not in node:  # e.g. trainer.strategy: "ddp"
            return None
        node = node[part]
    return node


def leaf_keys(node, prefix: str = "") -> list[str]:
    """Dotted keys of every value in a nested config (keys starting with ``_``, as ``_target_``, left out)."""
    out = []
    for k, v in node.items():
        if str(k).startswith("_"):
            continue
        out += leaf_keys(v, f"{prefix}{k}.") if isinstance(v, (dict, DictConfig)) else [f"{prefix}{k}"]
    return out


def check_method_keys(cfg: DictConfig) -> None:
    """Every key under ``method`` is a knob its method declares (``Method.declared_knobs``)."""
    if cfg.get("method") is None:
        return
    try:
        cls = method_class(cfg.get("method"))
    except MethodConfigError as e:
        raise ConfigValueError(str(e)) from None
    declared = {k.key for k in cls.declared_knobs()} | {"name"}
    for key in leaf_keys(cfg.method, ""):
        if key not in declared:
            raise ConfigValueError(
                f"method.{key} is not a knob of method {cfg.method.get('name')!r} ({cls.target()}); "
                f"its knobs: {', '.join(sorted(declared))}. Fix the override or src/cns_lightning/conf/method/*.yaml."
            )


def check_knob(knob: Knob, v) -> None:
    """Raise :class:`ConfigValueError` if ``v`` is not a valid value of ``knob``."""
    key, kind, lo, hi = knob.key, knob.kind, knob.lo, knob.hi
    if kind == "choice":
        if v not in knob.choices:
            raise ConfigValueError(f"{key}={v!r}: expected one of {', '.join(knob.choices)}. Fix the override or config file, e.g. {key}={knob.choices[0]}")
        return
    if kind == "bool":
        ok = isinstance(v, bool)
        want = "true or false"
    elif kind == "int":
        ok = isinstance(v, int) and not isinstance(v, bool) or (isinstance(v, float) and v.is_integer())
        want = "a whole number"
    else:  # float, float_or_null (null is skipped by the caller)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        want = "a finite number"
    if ok and kind != "bool":
        x = float(v)
        if (lo is not None and x < lo) or (hi is not None and x > hi):
            ok = False
    if not ok:
        rng = ""
        if kind != "bool":
            rng = f" >= {lo:g}" if lo is not None and hi is None else (f" in [{lo:g}, {hi:g}]" if lo is not None else "")
        example = knob.example or {"bool": "true", "int": "4"}.get(kind, "0.5")
        raise ConfigValueError(
            f"{key}={v!r} ({type(v).__name__}): expected {want}{rng}. "
            f"Fix the override or config file, e.g. {key}={example}"
        )


def check_config_values(cfg: DictConfig) -> None:
    """Raise :class:`ConfigValueError` for the first knob of the wrong type or out of range, or a
    ``method`` key its method does not declare (the declarations: ``knobs.knobs_of``)."""
    check_method_keys(cfg)
    for knob in sorted(knobs_of(cfg), key=lambda k: k.kind != "choice"):  # choices first
        v = _lookup(cfg, knob.key)
        if v is not None:
            check_knob(knob, v)


def check_device(device) -> None:
    """Raise :class:`ConfigValueError` unless ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) exists here."""
    import torch

    fix = "Fix: device=auto (the GPU when there is one, else the CPU) or device=cpu."
    if device == "auto":
        return
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        raise ConfigValueError(f"device={device!r} is not a device name; use auto, cpu, cuda or cuda:N. {fix}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigValueError(f"device={device!r}, but this machine has no usable CUDA GPU (torch.cuda.is_available() is False). {fix}")
        if dev.index is not None and dev.index >= n:
            raise ConfigValueError(f"device={device!r}, but this machine has {n} CUDA GPU(s) (cuda:0..cuda:{n - 1}). {fix}")
    elif dev.type != "cpu":
        raise ConfigValueError(f"device={device!r}: only auto, cpu, cuda and cuda:N are supported. {fix}")


def check_concept_inputs(concepts: list[Concept], resolution: int, cache_dir: str | os.PathLike | None) -> None:
    """Read every concept's folder, images and captions once, as training will.

    Raises :class:`~cns_lightning.images.ImageInputError` (missing or empty folder, a file that
    is not an image, truncated, empty, too small, too large, captions that do not match) or
    :class:`~cns_lightning.concepts.ConceptError`. Warns for each image whose short side is
    below ``resolution`` (it is upscaled) and, from ``load_image``, for animated images.
    """
    for c in concepts:
        paths = c.image_paths(cache_dir)
        c.captions(cache_dir)
        for p in paths:
            im = load_image(p, min_side=resolution // 4, reduce_to=resolution)
            if min(im.size) < resolution:
                warnings.warn(
                    f"{p}: image is {im.size[0]}x{im.size[1]}, smaller than data.resolution={resolution}; "
                    "it is upscaled (blurry). Use images at least that large for best results.",
                    UserWarning,
                    stacklevel=2,
                )
            im.close()


def output_bytes(kv_numel: int, token_dim: int, num_stages: int, prior_images: int, resolution: int) -> dict[str, int]:
    """Upper bound of the bytes a run writes.

    Per stage: the K/V values under the union of masks (at most every K/V entry, fp32), this
    concept's bit-packed masks, its token row (fp32) and JSON files (< 64 KiB); prior images as
    uncompressed RGB (PNG is smaller).
    """
    stage = 4 * kv_numel + (kv_numel + 7) // 8 + 4 * token_dim + 65536
    prior = prior_images * (3 * resolution * resolution + 4096)
    return dict(stages=num_stages * stage, per_stage=stage, priors=prior)


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk_space(run_dir: Path, cache_dir: Path, need: dict[str, int], reserve: int = 0) -> None:
    """Raise :class:`~cns_lightning.checkpoint.CheckpointError` unless the run's outputs fit.

    ``reserve`` (``min_free_bytes``) is free space to keep on top of the estimate.
    """
    same = _existing(run_dir).stat().st_dev == _existing(cache_dir).stat().st_dev
    out_fix = "point the output folder (hydra.run.dir=... or CNS_OUTPUT=...) at a disk with more room"
    cache_fix = "point the cache (prior images) at a disk with more room: paths.cache_dir=/path or CNS_CACHE=/path"
    if same:
        disk_free_check(run_dir, need["stages"] + need["priors"] + reserve, fix=f"{out_fix}, or {cache_fix}")
    else:
        disk_free_check(run_dir, need["stages"] + reserve, fix=out_fix)
        disk_free_check(cache_dir, need["priors"] + reserve, fix=cache_fix)


def oom_message(where: str, exc: BaseException) -> str:
    return (
        f"the GPU ran out of memory during {where} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}). "
        "Lower what it holds and rerun: data.batch_size (e.g. data.batch_size=1), prior.batch_size "
        "(e.g. prior.batch_size=1), trainer.precision=bf16-mixed (e.g. trainer=gpu), or the model "
        "resolution (model.resolution). Completed stages are kept. prior.batch_size and trainer.precision "
        "resume the same run folder; data.batch_size changes the training, so add +resume_with_changes=true "
        "to keep the completed stages (or give a new run folder with tag=...); a new resolution needs a new run folder."
    )
