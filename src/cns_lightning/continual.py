"""The continual loop: concepts 1..T, one Lightning ``fit`` each, into one model.

Read ``run`` top to bottom: build the base model, add every concept's token, generate (or reuse)
prior images with the base model, restore completed stages, then for each remaining concept:
select its neurons (Eq. 3-6, or an ablation), register its masks, train, save the stage,
evaluate. Re-running the same command resumes after the last completed stage.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .checkpoint import CheckpointError, atomic_write_bytes, load_json, save_json
from .concepts import Concept, concepts_from_config
from .data import ConceptDataModule
from .models import cross_attention_kv
from .module import CNSModule, NonFiniteLossError
from .preflight import check_concept_inputs, check_config_values, check_disk_space, oom_message, output_bytes
from .evaluation.loggers import build_loggers, finish_loggers, log_stage
from .prior import model_fingerprint, prior_images
from .selection import SelectionConfig, encode_norms, mask_stats, random_like_counts, select_concept_neurons
from .state import apply_stage, completed_stages, is_main_rank, ranks_agree, save_stage, stage_dir
from .tokens import add_concept_tokens, check_token_in_captions

NEURON_RULES = ("concept", "random", "all", "none")
# Config parts that define a run: a folder holding a run with other values is not resumed.
IDENTITY_KEYS = ("model", "data", "method", "seed", "prior", "calibration")


class RunError(RuntimeError):
    """A run cannot go on; the message says why and what to do."""


def stage_key(index: int) -> str:
    return f"c{index + 1:02d}"


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


# Knobs that change only speed or memory: not part of a run's identity.
PERFORMANCE_KEYS = ("data.num_workers", "prior.batch_size")
# Knobs added to the config after run folders existed: a folder whose run_identity.json lacks one
# (made before it existed) still resumes, and its remaining stages use the current value.
ADDED_KEYS = ("model.guidance_scale", "prior.precision", "prior.compile")
# Training knobs that +resume_with_changes=true lets a rerun change for the stages not yet done
# (e.g. a lower learning rate after a NaN stop); the change is recorded in run_identity.json.
RESUMABLE_CHANGES = (
    "method.lr_neurons", "method.lr_token", "method.steps", "method.lambda1", "method.lambda2", "method.prior_weight", "data.batch_size",
)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif not f"{prefix}{k}".startswith("_"):
            out[f"{prefix}{k}"] = v
    return out


def check_run_folder(run_dir: Path, cfg: DictConfig) -> None:
    """Write the run's defining config, or check that an existing run folder was made with it.

    A folder without a completed stage takes the new settings (nothing in it is kept). With
    completed stages, only ``RESUMABLE_CHANGES`` may differ, and only with ``resume_with_changes``.
    """
    identity = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in IDENTITY_KEYS if k in cfg}
    path = run_dir / "run_identity.json"
    if path.is_file():
        old = load_json(path)
        a, b = _flat(old), _flat(identity)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in PERFORMANCE_KEYS and not (k in ADDED_KEYS and k not in a))
        if not diff:
            if set(b) - set(a):  # knobs added since the folder was made: record their values from now on
                if "_changes" in old:
                    identity["_changes"] = old["_changes"]
                save_json(path, identity)
            return
        if not any((run_dir / "stages").glob("*/manifest.json")):
            print(f"[cns] {run_dir}: no completed stage yet, starting it with the new settings ({', '.join(diff)} changed)")
        elif cfg.get("resume_with_changes", False) and all(k in RESUMABLE_CHANGES for k in diff):
            change = {k: [a.get(k), b.get(k)] for k in diff}
            print(f"[cns] resume_with_changes: the remaining stages of {run_dir} use changed settings {change}")
            identity["_changes"] = list(old.get("_changes", [])) + [change]
        else:
            hint = " To keep the completed stages and train the rest with the new values, add +resume_with_changes=true." if all(k in RESUMABLE_CHANGES for k in diff) else ""
            raise RunError(
                f"{run_dir} holds a run made with other settings ({', '.join(diff)} differ), so it cannot be resumed.{hint} "
                "Give this run its own folder (e.g. name=my_variant, tag=_v2 or hydra.run.dir=...), or delete that folder to start over."
            )
    save_json(path, identity)


def select_masks(method: DictConfig, module: CNSModule, concept: Concept, captions: list[str], calib_norms, sel_cfg: SelectionConfig, seed: int):
    """The concept's masks per the method: CNS (Eq. 3-6), random neurons, all K/V, or none."""
    kv = {n: p.detach() for n, p in module.kv().items()}
    rule = method.neurons
    if rule in ("concept", "random"):
        caption_norms = encode_norms(module.text_encoder, module.tokenizer, captions, sel_cfg.tokens)
        masks, stats = select_concept_neurons(kv, caption_norms, calib_norms, sel_cfg)
        if rule == "random":
            masks = random_like_counts(masks, seed)
            stats = dict(mask_stats(masks), cns_statistics=stats["total"], rule="random, same count per layer as CNS")
        return masks, stats
    fill = rule == "all"
    masks = {n: torch.full(w.shape, fill, dtype=torch.bool, device=w.device) for n, w in kv.items()}
    return masks, dict(mask_stats(masks), rule=rule)


def make_loggers(cfg: DictConfig) -> list:
    """Lightning loggers of ``cfg.logger`` (W&B offline unless WANDB_MODE says otherwise)."""
    return build_loggers(cfg.get("logger"))


def setup_distributed(device: torch.device) -> torch.device:
    """Under torchrun (trainer=ddp): one GPU per rank, and the process group made early so prior
    generation can be split over ranks (Lightning reuses the group)."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def teardown_distributed() -> None:
    """After a completed run: wait for every rank, then close the process group (left open, its
    threads can abort the interpreter at exit: "terminate called without an active exception"),
    so a next Hydra job in this process starts a fresh one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def make_evaluator(cfg: DictConfig, run_dir: Path, concepts: list[Concept], device):
    ev_cfg = cfg.get("eval")
    if not is_main_rank():
        return None
    if not ev_cfg or not ev_cfg.get("enabled", True):
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


def run(cfg: DictConfig) -> dict:
    run_dir = Path(cfg.paths.run_dir)
    concepts = concepts_from_config(cfg.data.concepts)
    method = cfg.method
    if method.neurons not in NEURON_RULES:
        raise RunError(f"method.neurons={method.neurons!r}: choose one of {NEURON_RULES}")
    sel_cfg = SelectionConfig(**OmegaConf.to_container(method.selection, resolve=True))
    check_config_values(cfg)
    cache_dir = str(cfg.paths.cache_dir)
    check_concept_inputs(concepts, int(cfg.data.resolution), cache_dir)  # bad input fails before anything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    check_run_folder(run_dir, cfg)
    atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode("utf-8"))  # read by restore.py

    # 1. the base model and every concept's token
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    pipe = instantiate(cfg.model)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
    device = setup_distributed(device)
    pipe.to(device)
    fingerprint = model_fingerprint(pipe)
    save_json(run_dir / "base_model.json", {"fingerprint": fingerprint, "name": str(cfg.model.get("name", ""))})
    token_ids = add_concept_tokens(pipe.tokenizer, pipe.text_encoder, concepts)
    check_token_in_captions(pipe.tokenizer, concepts, token_ids, cache_dir)
    resolution = int(cfg.data.resolution)
    check_outputs_fit(cfg, pipe, run_dir, cache_dir, len(concepts))

    # 2. prior-preservation images from the base model (cached on disk across runs)
    priors = {}
    if cfg.prior.enabled:
        for c in concepts:
            try:
                priors[c.name] = prior_images(
                    pipe, c.class_prompt(), int(cfg.prior.num_images), cache_dir, seed=int(cfg.seed), resolution=resolution,
                    num_inference_steps=int(cfg.prior.num_inference_steps), guidance_scale=float(cfg.prior.guidance_scale),
                    batch_size=int(cfg.prior.batch_size), fingerprint=fingerprint,
                    precision=str(cfg.prior.get("precision", "bf16")), compile=bool(cfg.prior.get("compile", False)),
                )
            except torch.OutOfMemoryError as e:
                raise RunError(oom_message(f"prior-image generation for {c.name!r}", e)) from e

    # 3. the module, the calibration norms (Eq. 5 needs them once: the text encoder stays fixed
    #    but for the new tokens), and the stages already completed
    module = CNSModule(
        pipe, lr_neurons=method.lr_neurons * float(cfg.model.get("kv_lr_scale", 1.0)),
        lr_token=method.lr_token * float(cfg.model.get("token_lr_scale", 1.0)), prior_weight=method.prior_weight,
        lambda1=method.lambda1, lambda2=method.lambda2, nan_check_every=cfg.get("nan_check_every", 1),
        log_every=cfg.trainer.get("log_every_n_steps", 10),
    )
    calib_norms = encode_norms(pipe.text_encoder, pipe.tokenizer, calibration_prompts(cfg), sel_cfg.tokens)
    names = [c.name for c in concepts]
    done = completed_stages(run_dir, names) if cfg.get("resume", True) else []
    all_masks: list[dict[str, torch.Tensor]] = []
    for i, stage in enumerate(done):
        module.add_masks(stage_key(i), stage["masks"])
        all_masks.append(module.concept_masks(stage_key(i)))
        with torch.no_grad():
            pipe.text_encoder.get_input_embeddings().weight[token_ids[names[i]]] = stage["token"].to(device)
        module.step_offset += int(stage["info"].get("steps", 0))
    if done:
        apply_stage(module.kv(), module.kv_initial(), all_masks, done[-1]["kv"])
        print(f"[cns] resuming {run_dir}: stages 1-{len(done)} complete, continuing with stage {len(done) + 1}")

    loggers = make_loggers(cfg)
    evaluator = make_evaluator(cfg, run_dir, concepts, device)
    if evaluator is not None and not done:
        evaluator.before_training(pipe)
    if evaluator is not None and done and not evaluator.is_evaluated(len(done)):
        # interrupted between saving stage len(done) and evaluating it
        evaluator.after_stage(pipe, len(done), concepts[: len(done)])

    # 4. the continual sequence
    stages_info = [s["info"] for s in done]
    for m, concept in enumerate(concepts):
        if m < len(done):
            continue
        L.seed_everything(int(cfg.seed) + m, workers=True, verbose=False)  # each stage reproducible alone
        t0 = time.time()
        captions = concept.captions(cache_dir)
        masks, selection = select_masks(method, module, concept, captions, calib_norms, sel_cfg, int(cfg.seed) + m)
        module.add_masks(stage_key(m), masks)
        all_masks.append(module.concept_masks(stage_key(m)))
        module.begin_stage(stage_key(m), [token_ids[concept.name]], earlier=[stage_key(i) for i in range(m)], train_kv=method.neurons != "none")
        datamodule = ConceptDataModule(
            concept, pipe.tokenizer, resolution, steps=int(method.steps), batch_size=int(cfg.data.batch_size),
            prior_images=priors.get(concept.name), prior_prompt=concept.class_prompt(), vae=pipe.vae,
            cache_latents=bool(cfg.data.cache_latents), random_crop=bool(cfg.data.random_crop), flip_p=float(cfg.data.flip_p),
            num_workers=int(cfg.data.num_workers), seed=int(cfg.seed) + m, cache_dir=cache_dir,
        )
        trainer = instantiate(cfg.trainer, max_steps=int(method.steps), logger=loggers or False)
        try:
            trainer.fit(module, datamodule=datamodule)
        except NonFiniteLossError as e:
            module.end_stage()
            save_json(run_dir / "summary.json", summary(cfg, concepts, stages_info, status=f"stopped at stage {m + 1}: {e}"))
            raise RunError(
                f"{e}. Stages 1-{m} are saved and intact in {run_dir / 'stages'}; stage {m + 1} was not saved. "
                "The same command fails the same way again: lower method.lr_neurons / method.lr_token "
                "(or method.lambda1 / method.lambda2) or check the data, and add +resume_with_changes=true to "
                f"keep stages 1-{m} and continue from stage {m + 1} (or give a new run folder with tag=...)."
            ) from e
        except torch.OutOfMemoryError as e:
            raise RunError(oom_message(f"training of stage {m + 1} ({concept.name!r})", e)) from e
        if trainer.global_step < int(method.steps):  # stopped early (a callback, max_time ...): never save it as complete
            raise RunError(
                f"stage {m + 1} ({concept.name!r}) stopped after {trainer.global_step} of method.steps={int(method.steps)} steps, "
                f"so it was not saved; stages 1-{m} are intact. Rerun the same command to train stage {m + 1} again."
            )
        module.end_stage()
        module.step_offset += trainer.global_step
        try:  # under DDP every rank must end the stage with the same weights (one all-gather of a digest)
            world, digest = ranks_agree([*module.kv().values(), pipe.text_encoder.get_input_embeddings().weight[list(token_ids.values())]])
        except RuntimeError as e:
            raise RunError(f"stage {m + 1} ({concept.name!r}): {e}; stages 1-{m} are intact.") from e
        info = dict(
            concept=concept.name, token=concept.token, token_id=token_ids[concept.name], class_name=concept.class_name,
            category=concept.category, stage=m + 1, steps=trainer.global_step, seconds=round(time.time() - t0, 2),
            method=method.name, concept_entries=int(sum(int(x.sum()) for x in masks.values())),
            **(dict(ranks=world, weights_sha256=digest) if world > 1 else {}),
        )
        save_stage(
            stage_dir(run_dir, m, concept.name), dict(module.kv()), all_masks,
            pipe.text_encoder.get_input_embeddings().weight[token_ids[concept.name]], selection, info,
            initial=module.kv_initial(),  # K/V stored as fp16 deltas; the live weights are rounded to match
        )
        stages_info.append(info)
        if evaluator is not None:
            metrics = evaluator.after_stage(pipe, m + 1, concepts[: m + 1])
            log_stage(loggers, m + 1, metrics, images=evaluator.stage_images(m + 1), tables=evaluator.stage_tables())
        if is_main_rank():
            save_json(run_dir / "summary.json", summary(cfg, concepts, stages_info, status=f"stage {m + 1} of {len(concepts)} done"))

    if evaluator is not None:
        evaluator.finish(pipe, concepts)
    result = summary(cfg, concepts, stages_info, status="complete")
    if is_main_rank():
        save_json(run_dir / "summary.json", result)
    finish_loggers(loggers)  # wandb.finish() per job: every multirun job is its own W&B run
    return result


def summary(cfg: DictConfig, concepts: list[Concept], stages: list[dict], status: str) -> dict:
    return dict(
        name=str(cfg.get("name", "")), method=str(cfg.method.name), seed=int(cfg.seed), model=str(cfg.model.get("name", "")),
        concepts=[dict(name=c.name, token=c.token, class_name=c.class_name, category=c.category) for c in concepts],
        stages=stages, status=status,
    )
