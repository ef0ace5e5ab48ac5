"""Where a run's time goes: seconds per phase, written to ``summary.json`` (``phases``).

Phases: ``build`` (base model, tokens), ``priors`` (prior images), ``training`` (the stages'
``Trainer.fit``, selection included), ``saving`` (stage folders and the method's merge step),
``evaluation`` (the base model's and every stage's evaluation, the final multi-concept one), and
``compile``: the seconds spent inside ``torch.compile``'s compiler (Dynamo tracing, AOTAutograd,
Inductor code generation, forward and lazily compiled backward graphs, as
``torch._dynamo.utils.compilation_time_metrics`` records them), taken out of the phase they
happened in. CUDA-graph capture runs the compiled graphs, so it counts in the phase that ran them.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

PHASES = ("build", "priors", "compile", "training", "saving", "evaluation")
# Top-level compiler timers of torch._dynamo.utils.dynamo_timed (they do not nest in each other).
COMPILE_TIMERS = ("_compile.compile_inner", "backward._backward_impl")


def compile_seconds() -> float:
    """Seconds this process has spent in ``torch.compile``'s compiler so far."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # a torch without Dynamo
        return 0.0
    return float(sum(sum(compilation_time_metrics.get(k, ())) for k in COMPILE_TIMERS))


class PhaseTimer:
    """Wall seconds per phase; compile seconds are moved from the phase that paid them to ``compile``."""

    def __init__(self) -> None:
        self.seconds = {k: 0.0 for k in PHASES}

    @contextmanager
    def phase(self, name: str):
        if name not in self.seconds or name == "compile":
            raise ValueError(f"unknown phase {name!r}; phases are {', '.join(p for p in PHASES if p != 'compile')}")
        t0, c0 = time.perf_counter(), compile_seconds()
        try:
            yield
        finally:
            compiled = compile_seconds() - c0
            self.seconds[name] += time.perf_counter() - t0 - compiled
            self.seconds["compile"] += compiled

    def summary(self) -> dict[str, float]:
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["total"] = round(sum(self.seconds.values()), 3)
        return out
