"""The methods of the continual loop: one interface (``base.Method``), one file per method.

``src/cns_lightning/conf/method/<name>.yaml`` names its class with ``_target_``; :func:`build_method` makes it from
a run's ``method`` config. Run folders of the release before this package have no ``_target_``
in their config: their ``method.neurons`` rule names the class (``LEGACY_RULES``).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from .base import FORMAT_VERSION, Knob, Method, RunContext, SavedStage, StageFiles, StageFormatError
from .c_lora import CLoRA
from .cns import CNS
from .custom_diffusion import CustomDiffusion
from .full_kv import FullKV
from .mix_of_show import MixOfShow
from .orthogonal_adaptation import OrthogonalAdaptation
from .random_neurons import RandomNeurons
from .textual_inversion import TextualInversion

__all__ = [
    "CLoRA", "CNS", "CustomDiffusion", "FORMAT_VERSION", "MixOfShow", "OrthogonalAdaptation", "FullKV", "Knob", "LEGACY_RULES", "METHODS", "Method", "MethodConfigError", "RandomNeurons",
    "RunContext", "SavedStage", "StageFiles", "StageFormatError", "TextualInversion", "build_method", "method_class",
]

# Every registered method (the contract tests run for each).
METHODS: dict[str, type[Method]] = {
    "cns": CNS, "random_neurons": RandomNeurons, "full_kv": FullKV, "textual_inversion": TextualInversion, "custom_diffusion": CustomDiffusion,
    "c_lora": CLoRA, "orthogonal_adaptation": OrthogonalAdaptation, "mix_of_show": MixOfShow,
}
# method.neurons of configs written before methods/ -> the class that reproduces them.
LEGACY_RULES: dict[str, type[Method]] = {"concept": CNS, "random": RandomNeurons, "all": FullKV, "none": TextualInversion}


class MethodConfigError(ValueError):
    """``method`` names no known method; the message says which are."""


def method_class(method_cfg: Any) -> type[Method]:
    """The class a ``method`` config names: its ``_target_`` or, in older run folders, its ``neurons`` rule."""
    target = method_cfg.get("_target_") if method_cfg is not None else None
    known = ", ".join(f"{c.target()} ({n})" for n, c in METHODS.items())
    if target is None:
        rule = method_cfg.get("neurons") if method_cfg is not None else None
        if rule in LEGACY_RULES:
            return LEGACY_RULES[rule]
        raise MethodConfigError(f"method has no _target_ (and no neurons rule of an older run config): give method=<name> with one of {', '.join(METHODS)}, or method._target_=<one of {known}>")
    for cls in METHODS.values():
        if cls.target() == target:
            return cls
    from hydra.utils import get_class

    try:
        cls = get_class(str(target))
    except Exception as e:  # hydra raises ImportError / ValueError variants
        raise MethodConfigError(f"method._target_={target!r} cannot be imported ({e}); use one of {known}") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise MethodConfigError(f"method._target_={target!r} is not a cns_lightning.methods.Method; use one of {known}")
    return cls


def method_kwargs(cls: type[Method], method_cfg: Any) -> dict:
    """The constructor arguments of ``cls`` from a ``method`` config: its name and declared knobs."""
    container = OmegaConf.to_container(method_cfg, resolve=True) if isinstance(method_cfg, DictConfig) else dict(method_cfg)
    tops = {k.key.split(".")[0] for k in cls.declared_knobs()}
    return {k: v for k, v in container.items() if k == "name" or k in tops}


def build_method(method_cfg: Any) -> Method:
    """The method of a run's ``method`` config (as written by this release or an older one)."""
    cls = method_class(method_cfg)
    return cls(**method_kwargs(cls, method_cfg))
