"""The continual loop: concepts 1..T, one Lightning ``fit`` each, into one model, for any method.

Read ``run`` top to bottom: its phases are functions of their own. Build the base model with every
concept's token; generate (or reuse) prior images with the base model; set the method up and
restore the completed stages (``Method.load``); then for each remaining concept: the method's stage
(``begin_stage``: what trains), one ``Trainer.fit``, the stage's files (``end_stage``), the method's
merge step (``Method.merge``; its time and extra peak memory go into ``stage.json`` and, summed,
into ``summary.json``'s ``fusion``), the stage saved, evaluation; then the summary (with the seconds
of each phase: ``phases.py``). Prior images and evaluation sample with one ``sampling.Sampler``.
Re-running the same command resumes after the last completed stage, or, when the run is complete,
says so and changes nothing; a command whose ``data.concepts`` adds concepts after a run folder's
trains only the new ones (``run_folder.py``). What a method is: ``methods/base.py``.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .checkpoint import CheckpointError, atomic_write_bytes, load_json, save_json
from .concepts import Concept, concepts_from_config
from .data import ConceptDataModule
from .distributed import is_main_rank, ranks_agree, setup_distributed
from .fusion_cost import measure, sequence_totals
from .evaluation.loggers import build_loggers, check_logger_targets, log_hyperparameters, finish_loggers, log_stage
from .evaluation.validation import validation_callback
from .methods import FORMAT_VERSION, Method, RunContext, build_method
from .methods.base import ModelFitError, StageFormatError
from .methods.stage import TrainingStage
from .models import cross_attention_kv
from .module import ContinualModule, NonFiniteLossError
from .phases import PhaseTimer
from .preflight import check_concept_inputs, check_config_values, check_device, check_disk_space, oom_message, output_bytes
from .prior import model_fingerprint, prior_images
from .run_folder import RunFolderError, check_run_folder
from .sampling import Sampler
from .speedups import use_compile_cache
from .state import completed_stages, read_stage, stage_dir, write_stage
from .tokens import add_concept_tokens, check_token_in_captions, token_init


class RunError(RuntimeError):
    """A run cannot go on; the message says why and what to do."""


def calibration_prompts(cfg: DictConfig) -> list[str]:
    """The K calibration prompts of Eq. 5: an explicit list, a file, or the shipped PartiPrompts 20."""
    c = cfg.calibration
    if c.get("source") == "microworld":
        from .microworld.concepts import calibration_prompts as micro_prompts

        return micro_prompts(20 if c.get("num_prompts") is None else int(c.num_prompts))
    if c.get("prompts"):
        prompts = [str(p) for p in c.prompts]
    else:
        path = Path(c.prompts_file) if c.get("prompts_file") else Path(__file__).parent / "data" / "calib20_parti.txt"
        if not path.is_file():
            raise RunError(f"calibration.prompts_file={str(path)!r} does not exist; give a text file with one prompt per line")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    k = len(prompts) if c.get("num_prompts") is None else int(c.num_prompts)
    if len(prompts) < k:
        raise RunError(f"calibration: {len(prompts)} prompts found but calibration.num_prompts={k}; add prompts or lower it")
    return prompts[:k]


def make_evaluator(cfg: DictConfig, run_dir: Path, concepts: list[Concept], device):
    """The evaluator, on every rank (under torch.distributed the ranks share the sampling; rank 0 writes)."""
    ev_cfg = cfg.get("eval")
    if not ev_cfg or not ev_cfg.get("enabled", True):
        return None
    try:
        evaluator = instantiate(ev_cfg)
        evaluator.setup(run_dir, concepts, device)
    except Exception as e:  # a bad eval.* value or evaluator folder: its message names the key and the fix
        cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ is not None else e
        if isinstance(cause, (TypeError, ValueError, FileNotFoundError)) and str(cause).startswith("eval"):
            raise RunError(f"{cause} (conf/eval/*.yaml or an eval.* override)") from e
        raise
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
    except CheckpointError as e:  # the message names the folder to move: hydra.run.dir or paths.cache_dir / CNS_CACHE
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
    complete: dict | None = None  # the summary of a run folder that already holds this whole run
    sampler: Sampler | None = None  # prior images' sampler, handed on to the evaluator when its settings match
    timer: PhaseTimer = field(default_factory=PhaseTimer)


def check_inputs(cfg: DictConfig) -> Run:
    """Every check that needs no model, before anything is written; then the run folder's identity.
    A run folder that already holds this whole run is left as it is (``Run.complete``)."""
    run_dir, cache_dir = Path(cfg.paths.run_dir), str(cfg.paths.cache_dir)
    check_config_values(cfg)  # every knob of the run and of its method (knobs.py, Method.declared_knobs)
    concepts = concepts_from_config(cfg.data.get("concepts"))
    check_device(cfg.get("device", "auto"))
    check_logger_targets(cfg.get("logger"))
    method = build_method(cfg.method)
    check_concept_inputs(concepts, int(cfg.data.resolution), cache_dir)  # bad input fails before anything is written
    if str(cfg.model.get("name", "")) == "micro":  # own concepts in words the micro world never saw: a warning each
        from .microworld.concepts import warn_words_it_cannot_draw

        warn_words_it_cannot_draw(concepts, cache_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        check_run_folder(run_dir, cfg)
    except RunFolderError as e:
        raise RunError(str(e)) from None
    r = Run(cfg=cfg, run_dir=run_dir, cache_dir=cache_dir, concepts=concepts, method=method)
    r.complete = complete_summary(r)
    if r.complete is None:
        atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode("utf-8"))  # read by restore.py
        write_hydra_files(run_dir, cfg)
    return r


def complete_summary(r: Run) -> dict | None:
    """``summary.json`` of the run folder if it holds this whole run (every stage intact and
    readable by this code's method, the evaluation finished when it is on); else None."""
    path = r.run_dir / "summary.json"
    if not path.is_file() or not r.cfg.get("resume", True):
        return None
    try:
        done = load_json(path)
        names = [c["name"] for c in done.get("concepts", [])]
    except (CheckpointError, KeyError, TypeError, AttributeError):
        return None
    ev = r.cfg.get("eval")
    evaluated = not (ev and ev.get("enabled", True)) or (r.run_dir / "eval" / "results.json").is_file()
    if done.get("status") != "complete" or names != [c.name for c in r.concepts] or not evaluated:
        return None
    for i, name in enumerate(names):
        folder = stage_dir(r.run_dir, i, name)
        try:
            stage = read_stage(folder)  # every hash verified
        except CheckpointError:
            return None  # missing or damaged: the loop's resume names it and retrains from there
        try:
            r.method.check_writer(stage)
        except StageFormatError as e:
            raise RunError(f"{e} (resuming {r.run_dir})") from e
    return done


def write_hydra_files(run_dir: Path, cfg: DictConfig) -> None:
    """``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``, as Hydra writes them, but only
    once the command is accepted for this run folder (conf/config.yaml sets
    ``hydra.output_subdir: null``), so a refused command leaves a finished run's files untouched."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or not is_main_rank():
        return
    hydra_cfg = HydraConfig.instance().cfg
    folder = run_dir / ".hydra"
    files = {"config.yaml": cfg, "hydra.yaml": hydra_cfg, "overrides.yaml": hydra_cfg.hydra.overrides.task}
    for name, node in files.items():
        atomic_write_bytes(folder / name, OmegaConf.to_yaml(node).encode("utf-8"))


def build(r: Run) -> None:
    """The base model, on its device, with every concept's token."""
    cfg = r.cfg
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    pipe = instantiate(cfg.model)
    check_resolution(pipe, cfg)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
    pipe.to(setup_distributed(device))
    try:
        r.method.check_model(pipe, r.concepts)  # knobs that must fit the model (an orthogonal basis): before any stage
    except ModelFitError as e:
        raise RunError(f"{e} Nothing was trained.") from None
    r.fingerprint = model_fingerprint(pipe)  # of the base model before any token is added: names its prior-image cache
    save_json(r.run_dir / "base_model.json", {"fingerprint": r.fingerprint, "name": str(cfg.model.get("name", ""))})
    token_ids = add_concept_tokens(pipe.tokenizer, pipe.text_encoder, r.concepts, init=token_init(cfg), seed=int(cfg.seed))
    check_token_in_captions(pipe.tokenizer, r.concepts, token_ids, r.cache_dir)
    check_outputs_fit(cfg, pipe, r.run_dir, r.cache_dir, len(r.concepts))
    r.ctx = RunContext(
        pipe=pipe, concepts=r.concepts, token_ids=token_ids, seed=int(cfg.seed), cache_dir=r.cache_dir,
        calibration_prompts=calibration_prompts(cfg), kv_lr_scale=float(cfg.model.get("kv_lr_scale", 1.0)),
        token_lr_scale=float(cfg.model.get("token_lr_scale", 1.0)),
    )


def check_resolution(pipe, cfg: DictConfig) -> None:
    """The training resolution must be a multiple of the model's VAE scale factor (its latents are
    ``resolution / factor`` pixels a side)."""
    res, factor = int(cfg.data.resolution), int(getattr(pipe, "vae_scale_factor", 8))
    if res % factor:
        field = "data.resolution" if res != int(cfg.model.get("resolution", res)) else "model.resolution"
        near = max(factor, round(res / factor) * factor)
        raise RunError(
            f"{field}={res} is not a multiple of {factor}, the VAE scale factor of model {cfg.model.get('name', '')!r} "
            f"(images become latents of resolution / {factor} pixels). Fix: {field}={near}."
        )


def make_priors(r: Run) -> None:
    """Prior-preservation images from the base model (Eq. 8; cached on disk across runs)."""
    cfg, pipe, r.priors = r.cfg, r.ctx.pipe, {}
    if not cfg.prior.enabled:
        return
    r.sampler = Sampler(str(cfg.prior.get("precision", "bf16")), bool(cfg.prior.get("compile", False)))
    for c in r.concepts:
        try:
            r.priors[c.name] = prior_images(
                pipe, c.class_prompt(), int(cfg.prior.num_images), r.cache_dir, seed=int(cfg.seed), resolution=int(cfg.data.resolution),
                num_inference_steps=int(cfg.prior.num_inference_steps), guidance_scale=float(cfg.prior.guidance_scale),
                batch_size=int(cfg.prior.batch_size), fingerprint=r.fingerprint,
                sampler=r.sampler,
            )
        except torch.OutOfMemoryError as e:
            raise RunError(oom_message(f"prior-image generation for {c.name!r}", e)) from e
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise RunError(
                f"the cache disk is full: prior images for {c.name!r} could not be written to {r.cache_dir} ({e.strerror}). "
                "Free space there, or point the cache at a disk with room: paths.cache_dir=/path or the environment "
                "variable CNS_CACHE=/path. Completed stages are kept; rerun the same command."
            ) from e


def restore(r: Run) -> list[dict]:
    """The module, the method set up on the base model, and the completed stages loaded into it
    (``Method.load``, as ``restore.load_run`` does). Returns the completed stages' ``stage.json``."""
    cfg = r.cfg
    with r.timer.phase("build"):
        r.module = ContinualModule(r.ctx.pipe, prior_weight=r.method.prior_weight, nan_check_every=cfg.get("nan_check_every", 1),
                                   log_every=cfg.trainer.get("log_every_n_steps", 10))
        r.method.setup(r.ctx)
        done = completed_stages(r.run_dir, [c.name for c in r.concepts]) if cfg.get("resume", True) else []
    r.loggers = build_loggers(cfg.get("logger"))
    log_hyperparameters(r.loggers, cfg)  # the whole resolved config to every logger (W&B config, hparams.yaml)
    with r.timer.phase("evaluation"):
        r.evaluator = make_evaluator(cfg, r.run_dir, r.concepts, r.ctx.pipe.unet.device)
        take = getattr(r.evaluator, "use_sampler", None)  # eval may be any evaluator object (cfg.eval's _target_)
        shared = r.sampler is not None and take is not None and take(r.sampler)
        if r.sampler is not None and not shared:
            r.sampler.release()  # its GPU memory: the evaluator samples with its own settings
        if r.evaluator is not None:  # on the base model: stage 0, or what it lacks (concepts added to a finished run)
            r.evaluator.before_training(r.ctx.pipe)
    if done:
        with r.timer.phase("build"):
            try:
                for s in done:
                    r.method.check_writer(s)
                r.method.load(r.ctx, done)
            except StageFormatError as e:
                raise RunError(f"{e} (resuming {r.run_dir})") from e
        r.module.step_offset = sum(int(s.info.get("steps", 0)) for s in done)
        left = (f"continuing with stage {len(done) + 1} of {len(r.concepts)} ({r.concepts[len(done)].name})"
                if len(done) < len(r.concepts) else "every stage is trained; finishing the evaluation")
        say(f"resuming {r.run_dir}: stages 1-{len(done)} complete, {left}")
    if r.evaluator is not None and done and not r.evaluator.is_evaluated(len(done)):
        with r.timer.phase("evaluation"):
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
    samples = validation_callback(cfg, r.ctx.pipe, concept, seed=int(cfg.seed))  # validation.every_n_steps > 0: samples during the stage
    if samples is not None:
        trainer.callbacks.append(samples)
    try:
        trainer.fit(r.module, datamodule=datamodule)
    except NonFiniteLossError as e:
        r.module.end_stage()
        save_json(r.run_dir / "summary.json", summary(cfg, r.concepts, stages_info, status=f"stopped at stage {m + 1}: {e}", phases=r.timer.summary()))
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
    """Stage m's folder: the method's files, its merge step (``merge``: timed and measured, the cost
    goes into ``stage.json``) and ``stage.json``; returns the latter."""
    concept = r.concepts[m]
    try:  # under DDP every rank must end the stage with the same weights (one all-gather of a digest)
        world, digest = ranks_agree(r.method.live_tensors(r.ctx))
    except RuntimeError as e:
        raise RunError(f"stage {m + 1} ({concept.name!r}): {e}; stages 1-{m} are intact.") from e
    files = r.method.end_stage(r.ctx, m, concept)  # may round the live weights to what is saved
    cost = merge(r, m)
    info = dict(
        concept=concept.name, token=concept.token, token_id=r.ctx.token_ids[concept.name], class_name=concept.class_name,
        category=concept.category, stage=m + 1, steps=steps, seconds=round(seconds, 2), method=r.method.name,
        method_target=r.method.target(), format=FORMAT_VERSION, **files.info, **cost,
        **(dict(ranks=world, weights_sha256=digest) if world > 1 else {}),
    )
    write_stage(stage_dir(r.run_dir, m, concept.name), files, info)
    return info


def merge(r: Run, m: int) -> dict:
    """The method's fusion step after stage m (``Method.merge``), with its cost as Table 1 reports
    it (``fusion_cost.measure``: wall time, extra peak CPU and GPU memory)."""
    try:
        _, cost = measure(lambda: r.method.merge(r.ctx, m), r.ctx.pipe.unet.device)
    except torch.OutOfMemoryError as e:
        raise RunError(oom_message(f"the merge step of stage {m + 1} ({r.concepts[m].name!r})", e)) from e
    return cost


def run(cfg: DictConfig) -> dict:
    r = check_inputs(cfg)
    if r.complete is not None:  # nothing to train or evaluate: leave the folder as it is
        report = r.run_dir / "report.md"
        say(f"{r.run_dir} is complete: all {len(r.concepts)} concepts trained and evaluated; nothing to do"
            + (f" (report: {report})" if report.is_file() else "")
            + ". To add concepts, list them after these in data.concepts.")
        return r.complete
    use_compile_cache(r.cache_dir)  # Inductor's caches shared by every job and rerun on this machine
    with r.timer.phase("build"):
        build(r)
    with r.timer.phase("priors"):
        make_priors(r)
    stages_info = restore(r)
    for m in range(len(stages_info), len(r.concepts)):
        L.seed_everything(int(cfg.seed) + m, workers=True, verbose=False)  # each stage reproducible alone
        say(f"stage {m + 1}/{len(r.concepts)}: {r.concepts[m].name} ({r.concepts[m].token}, {r.method.name}, {r.method.steps} steps)")
        t0 = time.time()
        with r.timer.phase("training"):
            stage = r.method.begin_stage(r.ctx, m, r.concepts[m])  # what trains (CNS: selects the concept's neurons)
            steps = fit_stage(r, m, stage, stages_info)
        with r.timer.phase("saving"):
            info = save_stage(r, m, steps, time.time() - t0)  # with the method's merge step
        stages_info.append(info)
        evaluate(r, m, stages_info)
    return finish(r, stages_info)


def evaluate(r: Run, m: int, stages_info: list[dict]) -> None:
    """After stage m: the evaluation protocol (CLIP-I / CLIP-T of every concept so far), logged; the summary."""
    if r.evaluator is not None:
        with r.timer.phase("evaluation"):
            metrics = r.evaluator.after_stage(r.ctx.pipe, m + 1, r.concepts[: m + 1])
            if is_main_rank():
                log_stage(r.loggers, m + 1, metrics, images=r.evaluator.stage_images(m + 1), tables=r.evaluator.stage_tables())
    if is_main_rank():
        save_json(r.run_dir / "summary.json", summary(r.cfg, r.concepts, stages_info, status=f"stage {m + 1} of {len(r.concepts)} done",
                                                      phases=r.timer.summary()))


def finish(r: Run, stages_info: list[dict]) -> dict:
    if r.evaluator is not None:
        with r.timer.phase("evaluation"):
            r.evaluator.finish(r.ctx.pipe, r.concepts)
    result = summary(r.cfg, r.concepts, stages_info, status="complete", phases=r.timer.summary())
    if is_main_rank():
        save_json(r.run_dir / "summary.json", result)
    finish_loggers(r.loggers)  # wandb.finish() per job: every multirun job is its own W&B run
    say(final_message(r.run_dir, result))
    return result


def say(line: str) -> None:
    """One progress line on the console (rank 0 only), flushed at once (logs of long runs)."""
    if is_main_rank():
        print(f"[cns] {line}", flush=True)


def final_message(run_dir: Path, result: dict) -> str:
    """The run's closing lines: what was learned, where the report and the stages are."""
    stages = result["stages"]
    lines = [f"{result['status']}: {len(stages)} of {len(result['concepts'])} concepts "
             f"({', '.join(c['name'] for c in result['concepts'])}) in {run_dir}"]
    results = run_dir / "eval" / "results.json"
    if results.is_file():
        learned = load_json(results).get("learned") or {}
        if learned.get("of"):
            lines.append(f"  concepts learned: {learned['learned']} of {learned['of']}; still learned after the last stage: {learned['kept']}")
    report = run_dir / "report.md"
    lines.append(f"  report: {report}" if report.is_file() else "  report: none (evaluation off; eval=default writes report.md)")
    lines.append(f"  stages: {run_dir / 'stages'}; images: python -m cns_lightning.generate {run_dir} --prompt '...'")
    return "\n".join(lines)


def summary(cfg: DictConfig, concepts: list[Concept], stages: list[dict], status: str, phases: dict | None = None) -> dict:
    """``phases``: seconds of each phase of this process so far (``phases.PhaseTimer``; a resumed
    run counts from its restart)."""
    return dict(
        name=str(cfg.get("name", "")), method=str(cfg.method.name), seed=int(cfg.seed), model=str(cfg.model.get("name", "")),
        concepts=[dict(name=c.name, token=c.token, class_name=c.class_name, category=c.category) for c in concepts],
        stages=stages, fusion=sequence_totals(stages), status=status, **({"phases": phases} if phases is not None else {}),
    )
