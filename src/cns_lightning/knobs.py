"""Declarations of a run's config knobs: type, range, and place in the run's identity.

One table serves two readers: ``preflight.check_config_values`` checks every declared value before
anything is written, and ``run_folder.check_run_folder`` decides from it which differences keep a
run folder from resuming. The run-level knobs are declared here (``RUN_KNOBS``); each method declares
its own (``Method.declared_knobs()``, under ``method.``), so a new method brings its checks with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .prior import PRECISIONS
from .tokens import TOKEN_INITS

# Config groups that define a run: a folder holding a run with other values there is not resumed.
IDENTITY_GROUPS = ("model", "data", "method", "seed", "prior", "calibration")


@dataclass(frozen=True)
class Knob:
    """A config value: its type and range, and how it relates to a run's identity.

    ``kind``: "int" | "float" | "bool" | "choice" | "float_or_null". ``identity``: False for knobs
    that change only speed or memory (never compared on resume). ``resumable``: may differ on resume
    with ``+resume_with_changes=true`` (for the stages not yet done; e.g. a lower learning rate after
    a NaN stop). ``added``: introduced after run folders existed, so a folder made without it still
    resumes, its remaining stages using the current value; with ``before`` (the value such a folder
    ran with), only if the current value is ``before``.
    """

    key: str
    kind: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    identity: bool = True
    resumable: bool = False
    added: bool = False
    example: str | None = None
    before: object = None

    def under(self, prefix: str) -> "Knob":
        return Knob(**{**self.__dict__, "key": f"{prefix}{self.key}"})


RUN_KNOBS: tuple[Knob, ...] = (
    Knob("seed", "int", 0),
    Knob("nan_check_every", "int", 1),
    Knob("model.kv_lr_scale", "float", 0.0),
    Knob("model.token_lr_scale", "float", 0.0),
    Knob("model.guidance_scale", "float", added=True),
    Knob("data.resolution", "int", 8),
    Knob("data.batch_size", "int", 1, resumable=True),
    Knob("data.num_workers", "int", 0, identity=False),
    Knob("data.flip_p", "float", 0.0, 1.0),
    Knob("data.cache_latents", "bool"),
    Knob("data.random_crop", "bool"),
    Knob("data.token_init", "choice", choices=TOKEN_INITS, added=True),
    Knob("prior.enabled", "bool"),
    Knob("prior.num_images", "int", 0),
    Knob("prior.num_inference_steps", "int", 1),
    Knob("prior.guidance_scale", "float"),
    Knob("prior.batch_size", "int", 1, identity=False),
    Knob("prior.precision", "choice", choices=PRECISIONS, added=True),
    Knob("prior.compile", "bool", added=True),
    Knob("calibration.num_prompts", "int", 1, example="20"),
    Knob("eval.precision", "choice", choices=PRECISIONS, identity=False, added=True),
    Knob("eval.compile", "bool", identity=False, added=True),
    Knob("eval.regional_compile", "bool", identity=False, added=True),
    Knob("eval.batch_size", "int", 1, identity=False, added=True),
    Knob("resume", "bool"),
    Knob("validation.every_n_steps", "int", 0, identity=False, added=True),
    Knob("validation.num_images", "int", 1, identity=False, added=True),
    Knob("validation.num_inference_steps", "int", 1, identity=False, added=True),
    Knob("validation.guidance_scale", "float", 0.0, identity=False, added=True),
    Knob("min_free_bytes", "int", 0),
    Knob("trainer.strategy.sigterm_check_every_n_steps", "int", 1),  # trainer=ddp_compact
)


def knobs_of(cfg) -> tuple[Knob, ...]:
    """Every declared knob of a run's config: the run's and its method's (``method.``-prefixed)."""
    from .methods import method_class

    method = cfg.get("method") if hasattr(cfg, "get") else None
    if method is None:  # a partial config (no method group)
        return RUN_KNOBS
    return RUN_KNOBS + tuple(k.under("method.") for k in method_class(method).declared_knobs())
