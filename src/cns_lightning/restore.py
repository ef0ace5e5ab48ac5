"""Rebuild the model of a run folder after any completed stage (read-only: the run is untouched).

``load_run(run_dir, stage)`` repeats what the continual loop did, without training: the base model
from the run's ``config.yaml`` (``hydra.utils.instantiate(cfg.model)``, seeded as the loop seeds
it), every concept's token (``add_concept_tokens``, so token ids are the loop's), the run's method
(``methods.build_method``, also for configs of the release before ``methods/``), then stages
1..``stage`` loaded by the method (``Method.load``, the very call the loop makes to resume). The
result is bit-identical to the in-memory model at the end of that stage.

Unlike ``state.completed_stages`` (used by the loop to resume), nothing here deletes folders, so a
run can be restored while it is still training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import MANIFEST, CheckpointError
from .concepts import Concept, concepts_from_config
from .methods import MethodConfigError, RunContext, StageFormatError, build_method
from .state import check_concept, read_stage, stage_dir
from .tokens import add_concept_tokens, token_init

CONFIG = "config.yaml"


class RestoreError(ValueError):
    """A run folder cannot be restored as asked; the message names the folder and the fix."""


@dataclass
class RunInfo:
    """What a run folder holds, read without building the model."""

    run_dir: Path
    cfg: DictConfig
    concepts: list[Concept]  # every concept of the sequence, in order
    completed: int  # stages 1..completed have a finished stage folder (manifest written)

    def learned(self, stage: int) -> list[Concept]:
        return self.concepts[:stage]

    def resolution(self) -> int:
        data = self.cfg.get("data") or {}
        model = self.cfg.get("model") or {}
        return int(data.get("resolution") or model.get("resolution") or 512)

    def guidance(self) -> float:
        return guidance_default(self.cfg)


def guidance_default(cfg) -> float:
    """A run's sampling default, ``model.guidance_scale`` (micro 3.0, SD 6.0); 6.0 (Custom
    Diffusion's) for configs written before the knob existed."""
    model = cfg.get("model") or {}
    return float(model.get("guidance_scale") or 6.0)


def read_run(run_dir: str | Path) -> RunInfo:
    """Read a run folder's config and count its completed stages (hash checks come at load time)."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise RestoreError(f"{run_dir}: no such folder. Pass a run folder, e.g. outputs/<name>/<method>/seed<seed> (it holds config.yaml and stages/).")
    cfg_path = run_dir / CONFIG
    if not cfg_path.is_file():
        raise RestoreError(
            f"{run_dir}: not a run folder (no {CONFIG}). Pass the folder a run of `python -m cns_lightning` wrote, "
            "e.g. outputs/<name>/<method>/seed<seed> (it holds config.yaml, summary.json and stages/)."
        )
    try:
        cfg = OmegaConf.load(cfg_path)
    except Exception as e:  # yaml errors of several kinds
        raise RestoreError(f"{cfg_path}: not a readable config ({e}). Restore it from the run's .hydra/config.yaml or rerun the run.") from e
    for key in ("model", "data"):
        if key not in cfg or (key == "data" and "concepts" not in cfg.data):
            raise RestoreError(f"{cfg_path}: has no `{key}{'.concepts' if key == 'data' else ''}` entry, so it is not a cns_lightning run config. Pass a run folder.")
    concepts = concepts_from_config(cfg.data.concepts)
    completed = 0
    for i, c in enumerate(concepts):
        if not (stage_dir(run_dir, i, c.name) / MANIFEST).is_file():
            break
        completed = i + 1
    return RunInfo(run_dir=run_dir, cfg=cfg, concepts=concepts, completed=completed)


def check_stage(info: RunInfo, stage: int | None) -> int:
    """The stage to restore: ``stage`` checked against the completed ones, default the last."""
    names = ", ".join(f"{i + 1}={c.name}" for i, c in enumerate(info.concepts))
    if info.completed == 0:
        raise RestoreError(
            f"{info.run_dir}: no completed stage yet (no {info.run_dir / 'stages'}/01_{info.concepts[0].name}/{MANIFEST}). "
            "Run or resume the run (rerun its command) until at least stage 1 finishes."
        )
    if stage is None:
        return info.completed
    if isinstance(stage, bool) or not isinstance(stage, int) or not 1 <= stage <= info.completed:
        raise RestoreError(
            f"{info.run_dir}: stage={stage!r} is out of range: stages 1..{info.completed} are complete "
            f"(of {len(info.concepts)}: {names}). Pass a stage from 1 to {info.completed}, or leave it out for the last."
        )
    return stage


def build_base(cfg: DictConfig, device: str | torch.device = "cpu"):
    """The run's base pipeline, built as the loop builds it (same seeding); the caller's RNG state is kept."""
    from hydra.utils import instantiate
    import lightning as L

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []):
        L.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
        pipe = instantiate(cfg.model)
    random.setstate(py_state)
    np.random.set_state(np_state)
    return pipe.to(torch.device(device))


def run_calibration_prompts(info: RunInfo) -> list[str]:
    """The run's K calibration prompts, as the loop read them (a method's merge may use them:
    ``custom_diffusion``); none for configs without a ``calibration`` entry."""
    if "calibration" not in info.cfg:
        return []
    from .continual import RunError, calibration_prompts

    try:
        return calibration_prompts(info.cfg)
    except RunError as e:
        raise RestoreError(f"{info.run_dir / CONFIG}: {e}") from None


def load_run(
    run_dir: str | Path,
    stage: int | None = None,
    device: str | torch.device = "cpu",
    tokens: str = "all",
):
    """The pipeline of ``run_dir`` after ``stage`` (default: the last completed) and the concepts learned by then.

    ``tokens="all"`` adds every concept's token as the loop does (bit-identical to the in-memory
    model, not-yet-learned tokens at their initial embedding); ``tokens="learned"`` adds only the
    tokens of concepts 1..stage (same ids and rows; the text encoder's vocabulary holds nothing
    untrained; used by export).
    """
    if tokens not in ("all", "learned"):
        raise ValueError(f"tokens={tokens!r}: choose 'all' or 'learned'")
    info = read_run(run_dir)
    stage = check_stage(info, stage)
    learned = info.learned(stage)
    try:
        method = build_method(info.cfg.method)
    except MethodConfigError as e:
        raise RestoreError(f"{info.run_dir / CONFIG}: {e}") from None
    stages = []
    for i, c in enumerate(learned):
        folder = stage_dir(info.run_dir, i, c.name)
        try:
            s = read_stage(folder)  # verifies every file's sha256
            check_concept(s, c.name, i + 1, f"{info.run_dir / CONFIG} and the folder are from different runs; restore from the run folder as the run wrote it.")
        except CheckpointError as e:
            earlier = f" Or restore an earlier stage (stage={i} / --stage {i}): stages 1..{i} are intact." if i else ""
            raise RestoreError(f"{e}{earlier}") from e
        try:
            method.check_writer(s)
        except StageFormatError as e:
            raise RestoreError(f"{e} (run config: {info.run_dir / CONFIG})") from None
        stages.append(s)

    pipe = build_base(info.cfg, device)
    ids = add_concept_tokens(pipe.tokenizer, pipe.text_encoder, info.concepts if tokens == "all" else learned,
                             init=token_init(info.cfg), seed=int(info.cfg.get("seed", 0)))
    ctx = RunContext(pipe=pipe, concepts=learned, token_ids=ids, seed=int(info.cfg.get("seed", 0)), calibration_prompts=run_calibration_prompts(info))
    method.setup(ctx)
    try:
        method.load(ctx, stages)
    except StageFormatError as e:
        raise RestoreError(f"{e} (run config: {info.run_dir / CONFIG}, model={info.cfg.model.get('name', info.cfg.model.get('_target_'))})") from e
    return pipe, learned
