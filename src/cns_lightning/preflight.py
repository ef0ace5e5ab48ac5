"""Checks a run makes before it writes anything: config values, concept inputs, disk space.

* :func:`check_config_values` - every numeric/boolean knob the loop reads has the right type and
  range (``method.steps=abc`` fails here, naming the field, not deep inside the Trainer).
* :func:`check_concept_inputs` - every concept folder exists and holds images, every image
  decodes (after the repairs :func:`cns_lightning.images.load_image` documents), captions match
  the images. Images smaller than the training resolution are upscaled, with a warning.
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
from .prior import PRECISIONS

__all__ = ["ConfigValueError", "check_concept_inputs", "check_config_values", "check_disk_space", "oom_message", "output_bytes"]


class ConfigValueError(ValueError):
    """A config value of the wrong type or out of range; the message names the key and the fix."""


# key -> (kind, lower bound, upper bound); bounds inclusive, None: unbounded
_KNOBS: dict[str, tuple[str, float | None, float | None]] = {
    "seed": ("int", 0, None),
    "nan_check_every": ("int", 1, None),
    "method.steps": ("int", 1, None),
    "method.lr_neurons": ("float", 0.0, None),
    "method.lr_token": ("float", 0.0, None),
    "method.lambda1": ("float", 0.0, None),
    "method.lambda2": ("float", 0.0, None),
    "method.prior_weight": ("float", 0.0, None),
    "model.kv_lr_scale": ("float", 0.0, None),
    "model.token_lr_scale": ("float", 0.0, None),
    "data.resolution": ("int", 8, None),
    "data.batch_size": ("int", 1, None),
    "data.num_workers": ("int", 0, None),
    "data.flip_p": ("float", 0.0, 1.0),
    "data.cache_latents": ("bool", None, None),
    "data.random_crop": ("bool", None, None),
    "prior.enabled": ("bool", None, None),
    "prior.num_images": ("int", 0, None),
    "prior.num_inference_steps": ("int", 1, None),
    "prior.guidance_scale": ("float", None, None),
    "prior.batch_size": ("int", 1, None),
    "prior.compile": ("bool", None, None),
    "resume": ("bool", None, None),
    "min_free_bytes": ("int", 0, None),
    "trainer.strategy.sigterm_check_every_n_steps": ("int", 1, None),  # trainer=ddp_compact
}


# key -> the values it may take
_CHOICES: dict[str, tuple[str, ...]] = {
    "prior.precision": PRECISIONS,
}


def _lookup(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        if node is None or isinstance(node, str) or part not in node:  # e.g. trainer.strategy: "ddp"
            return None
        node = node[part]
    return node


def check_config_values(cfg: DictConfig) -> None:
    """Raise :class:`ConfigValueError` for the first knob of the wrong type or out of range."""
    for key, allowed in _CHOICES.items():
        v = _lookup(cfg, key)
        if v is not None and v not in allowed:
            raise ConfigValueError(f"{key}={v!r}: expected one of {', '.join(allowed)}. Fix the override or config file, e.g. {key}={allowed[0]}")
    for key, (kind, lo, hi) in _KNOBS.items():
        v = _lookup(cfg, key)
        if v is None:
            continue
        if kind == "bool":
            ok = isinstance(v, bool)
            want = "true or false"
        elif kind == "int":
            ok = isinstance(v, int) and not isinstance(v, bool) or (isinstance(v, float) and v.is_integer())
            want = "a whole number"
        else:
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
            raise ConfigValueError(
                f"{key}={v!r} ({type(v).__name__}): expected {want}{rng}. "
                f"Fix the override or config file, e.g. {key}={_example(key, kind)}"
            )


def _example(key: str, kind: str) -> str:
    return {"bool": "true", "int": "4", "float": "0.5"}[kind] if key not in ("method.steps",) else "500"


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
    if same:
        disk_free_check(run_dir, need["stages"] + need["priors"] + reserve)
    else:
        disk_free_check(run_dir, need["stages"] + reserve)
        disk_free_check(cache_dir, need["priors"] + reserve)


def oom_message(where: str, exc: BaseException) -> str:
    return (
        f"the GPU ran out of memory during {where} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}). "
        "Lower what it holds and rerun: data.batch_size (e.g. data.batch_size=1), prior.batch_size "
        "(e.g. prior.batch_size=1), trainer.precision=bf16-mixed (e.g. trainer=gpu), or the model "
        "resolution (model.resolution). Completed stages are kept. prior.batch_size and trainer.precision "
        "resume the same run folder; data.batch_size changes the training, so add +resume_with_changes=true "
        "to keep the completed stages (or give a new run folder with tag=...); a new resolution needs a new run folder."
    )
