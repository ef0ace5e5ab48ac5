"""The continual loop: concepts 1..T, one Lightning ``fit`` each, into one model, for any method.

Read ``run`` top to bottom: its phases are functions of their own. Build the base model with every
concept's token; generate (or reuse) prior images with the base model; set the method up and
restore the completed stages (``Method.load``); then for each remaining concept: the method's stage
(``begin_stage``: what trains), one ``Trainer.fit``, the stage saved (``end_stage``), the method's
merge step (timed), evaluation; then the summary. Re-running the same command resumes after the
last completed stage. What a method is: ``methods/base.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .checkpoint import CheckpointError, atomic_write_bytes, save_json
from .concepts import Concept, concepts_from_config
from .data import ConceptDataModule
from .distributed import is_main_rank, ranks_agree, setup_distributed
from .evaluation.loggers import build_loggers, log_hyperparameters, finish_loggers, log_stage
from .methods import FORMAT_VERSION, Method, RunContext, build_method
from .methods.base import ModelFitError, StageFormatError
from .methods.stage import TrainingStage
from .models import cross_attention_kv
from .module import ContinualModule, NonFiniteLossError
from .preflight import check_concept_inputs, check_config_values, check_disk_space, oom_message, output_bytes
from .prior import model_fingerprint, prior_images
from .run_folder import RunFolderError, check_run_folder
from .state import completed_stages, stage_dir, write_stage
from .tokens import add_concept_tokens, check_token_in_captions


class RunError(RuntimeError):
    """A run cannot go on; the message says why and what to do."""


def calibration_prompts(cfg: DictConfig) -> list[str]:
    """The K calibration prompts of Eq. 5: an explicit list, a file, or the shipped PartiPrompts 20."""
    c = cfg.calibration
    if c.get("source") == "microworld":
        from .microworld.concepts import calibration_prompts as micro_prompts

        return micro_prompts(int(c.get("num_prompts") or 20))
    if c.get("prompts"):
        prompts = [str(p) for p in c.prompts]
    else:
        path = Path(c.prompts_file) if c.get("prompts_file") else Path(__file__).parent / "data" / "calib20_parti.txt"
        if not path.is_file():
            raise RunError(f"calibration.prompts_file={str(path)!r} does not exist; give a text file with one prompt per line")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    k = int(c.get("num_prompts") or len(prompts))
    if len(prompts) < k:
        raise RunError(f"calibration: {len(prompts)} prompts found but calibration.num_prompts={k}; add prompts or lower it")
    return prompts[:k]


def make_evaluator(cfg: DictConfig, run_dir: Path, concepts: list[Concept], device):
    ev_cfg = cfg.get("eval")
    if not is_main_rank() or not ev_cfg or not ev_cfg.get("enabled", True):
        return None
    evaluator = instantiate(ev_cfg)
    evaluator.setup(run_dir, concepts, device)
    return evaluator


def check_outputs_fit(cfg: DictConfig, pipe, run_dir: Path, cache_dir: str, num_concepts: int) -> None:
    """Stop before any stage when the disk cannot hold the remaining stages and prior images."""
    done = len(list((run_dir / "stages").glob("*/manifest.json")))
    need = output_bytes(
        sum(p.numel() for p in cross_attention_kv(pipe.unet).values()), pipe.text_encoder.get_input_embeddings().weight.shape[1],
        max(0, num_concepts - done), int(cfg.prior.num_images) * num_concepts if cfg.prior.enabled else 0, int(cfg.data.resolution),
    )
    try:
        check_disk_space(run_dir, Path(cache_dir), need, int(cfg.get("min_free_bytes", 0)))
    except CheckpointError as e:
        raise RunError(
            f"{e} Estimate: {max(0, num_concepts - done)} stages x {need['per_stage']} bytes (K/V values, masks, token) "
            f"+ {need['priors']} bytes of prior images + min_free_bytes={int(cfg.get('min_free_bytes', 0))}. Nothing was trained."
        ) from e


@dataclass
class Run:
    """What the phases of ``run`` share."""

    cfg: DictConfig
    run_dir: Path
    cache_dir: str
    concepts: list[Concept]
    method: Method
    ctx: RunContext | None = None
    fingerprint: str = ""
    module: ContinualModule | None = None
    priors: dict | None = None
    loggers: list | None = None
    evaluator: object = None


def check_inputs(cfg: DictConfig) -> Run:
    """Every check that needs no model, before anything is written; then the run folder's identity."""
    run_dir, cache_dir = Path(cfg.paths.run_dir), str(cfg.paths.cache_dir)
    concepts = concepts_from_config(cfg.data.concepts)
    check_config_values(cfg)  # every knob of the run and of its method (knobs.py, Method.declared_knobs)
    method = build_method(cfg.method)
    check_concept_inputs(concepts, int(cfg.data.resolution), cache_dir)  # bad input fails before anything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        check_run_folder(run_dir, cfg)
    except RunFolderError as e:
        raise RunError(str(e)) from None
    atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode("utf-8"))  # read by restore.py
    return Run(cfg=cfg, run_dir=run_dir, cache_dir=cache_dir, concepts=concepts, method=method)


def build(r: Run) -> None:
    """The base model, on its device, with every concept's token."""
    cfg = r.cfg
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    pipe = instantiate(cfg.model)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
    pipe.to(setup_distributed(device))
    try:
        r.method.check_model(pipe, r.concepts)  # knobs that must fit the model (an orthogonal basis): before any stage
    except ModelFitError as e:
        raise RunError(f"{e} Nothing was trained.") from None
    r.fingerprint = model_fingerprint(pipe)  # of the base model before any token is added: names its prior-image cache
    save_json(r.run_dir / "base_model.json", {"fingerprint": r.fingerprint, "name": str(cfg.model.get("name", ""))})
    token_ids = add_concept_tokens(pipe.tokenizer, pipe.text_encoder, r.concepts)
    check_token_in_captions(pipe.tokenizer, r.concepts, token_ids, r.cache_dir)
    check_outputs_fit(cfg, pipe, r.run_dir, r.cache_dir, len(r.concepts))
    r.ctx = RunContext(
        pipe=pipe, concepts=r.concepts, token_ids=token_ids, seed=int(cfg.seed), cache_dir=r.cache_dir,
        calibration_prompts=calibration_prompts(cfg), kv_lr_scale=float(cfg.model.get("kv_lr_scale", 1.0)),
        token_lr_scale=float(cfg.model.get("token_lr_scale", 1.0)),
    )


def make_priors(r: Run) -> None:
    """Prior-preservation images from the base model (Eq. 8; cached on disk across runs)."""
    cfg, pipe, r.priors = r.cfg, r.ctx.pipe, {}
    if not cfg.prior.enabled:
        return
    for c in r.concepts:
        try:
            r.priors[c.name] = prior_images(
                pipe, c.class_prompt(), int(cfg.prior.num_images), r.cache_dir, seed=int(cfg.seed), resolution=int(cfg.data.resolution),
                num_inference_steps=int(cfg.prior.num_inference_steps), guidance_scale=float(cfg.prior.guidance_scale),
                batch_size=int(cfg.prior.batch_size), fingerprint=r.fingerprint,
                precision=str(cfg.prior.get("precision", "bf16")), compile=bool(cfg.prior.get("compile", False)),
            )
        except torch.OutOfMemoryError as e:
            raise RunError(oom_message(f"prior-image generation for {c.name!r}", e)) from e


def restore(r: Run) -> list[dict]:
    """The module, the method set up on the base model, and the completed stages loaded into it
    (``Method.load``, as ``restore.load_run`` does). Returns the completed stages' ``stage.json``."""
    cfg = r.cfg
    r.module = ContinualModule(r.ctx.pipe, prior_weight=r.method.prior_weight, nan_check_every=cfg.get("nan_check_every", 1),
                               log_every=cfg.trainer.get("log_every_n_steps", 10))
    r.method.setup(r.ctx)
    done = completed_stages(r.run_dir, [c.name for c in r.concepts]) if cfg.get("resume", True) else []
    if done:
        try:
            for s in done:
                r.method.check_writer(s)
            r.method.load(r.ctx, done)
        except StageFormatError as e:
            raise RunError(f"{e} (resuming {r.run_dir})") from e
        r.module.step_offset = sum(int(s.info.get("steps", 0)) for s in done)
        print(f"[cns] resuming {r.run_dir}: stages 1-{len(done)} complete, continuing with stage {len(done) + 1}")
    r.loggers = build_loggers(cfg.get("logger"))
    log_hyperparameters(r.loggers, cfg)  # the whole resolved config to every logger (W&B config, hparams.yaml)
    r.evaluator = make_evaluator(cfg, r.run_dir, r.concepts, r.ctx.pipe.unet.device)
    if r.evaluator is not None and not done:
        r.evaluator.before_training(r.ctx.pipe)
    if r.evaluator is not None and done and not r.evaluator.is_evaluated(len(done)):
        r.evaluator.after_stage(r.ctx.pipe, len(done), r.concepts[: len(done)])  # interrupted between saving and evaluating it
    return [s.info for s in done]


def fit_stage(r: Run, m: int, stage: TrainingStage, stages_info: list[dict]) -> int:
    """Stage m: one ``Trainer.fit`` of the method's ``stage``; returns the steps trained. Stops the
    run, keeping stages 1..m, on a NaN loss, an OOM or an early stop."""
    cfg, concept, steps = r.cfg, r.concepts[m], r.method.steps
    r.module.begin_stage(stage)
    datamodule = ConceptDataModule(
        concept, r.ctx.pipe.tokenizer, int(cfg.data.resolution), steps=steps, batch_size=int(cfg.data.batch_size),
        prior_images=r.priors.get(concept.name), prior_prompt=concept.class_prompt(), vae=r.ctx.pipe.vae,
        cache_latents=bool(cfg.data.cache_latents), random_crop=bool(cfg.data.random_crop), flip_p=float(cfg.data.flip_p),
        num_workers=int(cfg.data.num_workers), seed=int(cfg.seed) + m, cache_dir=r.cache_dir,
    )
    trainer = instantiate(cfg.trainer, max_steps=steps, logger=r.loggers or False)
    try:
        trainer.fit(r.module, datamodule=datamodule)
    except NonFiniteLossError as e:
        r.module.end_stage()
        save_json(r.run_dir / "summary.json", summary(cfg, r.concepts, stages_info, status=f"stopped at stage {m + 1}: {e}"))
        raise RunError(
            f"{e}. Stages 1-{m} are saved and intact in {r.run_dir / 'stages'}; stage {m + 1} was not saved. "
            "The same command fails the same way again: lower method.lr_neurons / method.lr_token "
            "(or method.lambda1 / method.lambda2) or check the data, and add +resume_with_changes=true to "
            f"keep stages 1-{m} and continue from stage {m + 1} (or give a new run folder with tag=...)."
        ) from e
    except torch.OutOfMemoryError as e:
        raise RunError(oom_message(f"training of stage {m + 1} ({concept.name!r})", e)) from e
    if trainer.global_step < steps:  # stopped early (a callback, max_time ...): never save it as complete
        raise RunError(
            f"stage {m + 1} ({concept.name!r}) stopped after {trainer.global_step} of method.steps={steps} steps, "
            f"so it was not saved; stages 1-{m} are intact. Rerun the same command to train stage {m + 1} again."
        )
    r.module.end_stage()
    r.module.step_offset += trainer.global_step
    return trainer.global_step


def save_stage(r: Run, m: int, steps: int, seconds: float) -> dict:
    """Stage m's folder: the method's files and ``stage.json``; returns the latter."""
    concept = r.concepts[m]
    try:  # under DDP every rank must end the stage with the same weights (one all-gather of a digest)
        world, digest = ranks_agree(r.method.live_tensors(r.ctx))
    except RuntimeError as e:
        raise RunError(f"stage {m + 1} ({concept.name!r}): {e}; stages 1-{m} are intact.") from e
    files = r.method.end_stage(r.ctx, m, concept)  # may round the live weights to what is saved
    info = dict(
        concept=concept.name, token=concept.token, token_id=r.ctx.token_ids[concept.name], class_name=concept.class_name,
        category=concept.category, stage=m + 1, steps=steps, seconds=round(seconds, 2), method=r.method.name,
        method_target=r.method.target(), format=FORMAT_VERSION, **files.info,
        **(dict(ranks=world, weights_sha256=digest) if world > 1 else {}),
    )
    write_stage(stage_dir(r.run_dir, m, concept.name), files, info)
    return info


def merge(r: Run, m: int, info: dict) -> None:
    """The method's fusion step after stage m, timed and memory-measured (Table 1 reports its cost)."""
    cuda = r.ctx.pipe.unet.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    r.method.merge(r.ctx, m)
    info["merge_seconds"] = round(time.perf_counter() - t0, 4)
    if cuda:
        info["merge_peak_bytes"] = int(torch.cuda.max_memory_allocated())


def run(cfg: DictConfig) -> dict:
    r = check_inputs(cfg)
    build(r)
    make_priors(r)
    stages_info = restore(r)
    for m in range(len(stages_info), len(r.concepts)):
        L.seed_everything(int(cfg.seed) + m, workers=True, verbose=False)  # each stage reproducible alone
        t0 = time.time()
        stage = r.method.begin_stage(r.ctx, m, r.concepts[m])  # what trains (CNS: selects the concept's neurons)
        steps = fit_stage(r, m, stage, stages_info)
        info = save_stage(r, m, steps, time.time() - t0)
        merge(r, m, info)
        stages_info.append(info)
        evaluate(r, m, stages_info)
    return finish(r, stages_info)


def evaluate(r: Run, m: int, stages_info: list[dict]) -> None:
    """After stage m: the evaluation protocol (CLIP-I / CLIP-T of every concept so far), logged; the summary."""
    if r.evaluator is not None:
        metrics = r.evaluator.after_stage(r.ctx.pipe, m + 1, r.concepts[: m + 1])
        log_stage(r.loggers, m + 1, metrics, images=r.evaluator.stage_images(m + 1), tables=r.evaluator.stage_tables())
    if is_main_rank():
        save_json(r.run_dir / "summary.json", summary(r.cfg, r.concepts, stages_info, status=f"stage {m + 1} of {len(r.concepts)} done"))


def finish(r: Run, stages_info: list[dict]) -> dict:
    if r.evaluator is not None:
        r.evaluator.finish(r.ctx.pipe, r.concepts)
    result = summary(r.cfg, r.concepts, stages_info, status="complete")
    if is_main_rank():
        save_json(r.run_dir / "summary.json", result)
    finish_loggers(r.loggers)  # wandb.finish() per job: every multirun job is its own W&B run
    return result


def summary(cfg: DictConfig, concepts: list[Concept], stages: list[dict], status: str) -> dict:
    return dict(
        name=str(cfg.get("name", "")), method=str(cfg.method.name), seed=int(cfg.seed), model=str(cfg.model.get("name", "")),
        concepts=[dict(name=c.name, token=c.token, class_name=c.class_name, category=c.category) for c in concepts],
        stages=stages, status=status,
    )
