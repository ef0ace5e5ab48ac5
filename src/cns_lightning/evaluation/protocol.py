"""The continual-personalization evaluation protocol, called by the training loop.

::

    ev = ContinualEvaluator(**cfg.eval)
    ev.setup(run_dir, concepts, device)           # loads CLIP and run_dir/eval/state.json if any
    ev.before_training(pipe)                      # stage 0: the base model
    for t, concept in enumerate(concepts, 1):
        ...train concept t...
        metrics = ev.after_stage(pipe, t, concepts[:t])   # fills row t of the forgetting matrices
    results = ev.finish(pipe, concepts)           # multi-concept prompts; results.json + report.md

Per stage t every learned concept i <= t is generated on its single-concept prompts (with its
modifier token) and scored: R_clip_i[t, i] and R_clip_t[t, i] (CLIP-T on the prompt without the
token). The same seeds are used at every stage (sample k of prompt j: ``seed + 1000 j + k``), so
the rows differ only by what the model learned or forgot.

Images come from ``sampling.Sampler``, the sampler prior images use (bf16 where the device
supports it, batched, optionally compiled; the loop hands the evaluator its prior sampler when
the settings match: ``use_sampler``). Noise is drawn on the CPU (``generator_device``), so the same
seeds give the same images on every device. Under ``torch.distributed`` every rank samples every
world-size-th image and embeds it with CLIP (and DINO); the embeddings and the first sample of
each prompt are gathered, so every rank holds the same scores and rank 0 alone writes files.
"""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..concepts import Concept
from ..distributed import is_main_rank, rank_and_world
from ..sampling import Sampler
from .forgetting import backward_transfer, forgetting, last_stage, new_matrix
from .metrics import ClipScorer, DinoScorer, clip_text_score, load_dino, make_clip, per_image_similarity, self_similarity
from .prompts import DEFAULT_MULTI_PROMPTS, EvalPrompt, default_zero_shot_prompts, multi_prompts, single_prompts, zero_shot
from .state import EvalState, StateError, atomic_write_json
from .summary import results_from_state

KNOWN_EXTRA = {
    "batch_size": 8,  # images per pipeline call
    "max_pairs": None,  # multi-concept pairs evaluated in finish() (None: all)
    "thumbnail": 128,  # saved sample images are at most this many px
    "generator_device": "cpu",  # torch.Generator device; cpu gives the same noise on every device
    # Seed of the tiny random CLIP (clip_preset=tiny). With seed 3 its random towers give positive
    # image-text cosines on the tiny pipeline's images, so smoke runs exercise unclamped CLIP-T.
    "clip_seed": 3,
    "write_report": True,  # write report.md + figures after every stage
    "precision": "bf16",  # the sampler's precision where the device supports it (a CPU samples in fp32)
    "compile": False,  # torch.compile the sampler's UNet + VAE decoder (static shapes: batches padded)
    "regional_compile": False,  # with compile: only the UNet's repeated transformer blocks (diffusers' compile_repeated_blocks)
}


def _eval_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "eval"


class ContinualEvaluator:
    """Forgetting matrices, zero-shot and multi-concept scores of a continual run (see module doc)."""

    def __init__(
        self,
        clip_path: str | None = None,
        clip_preset: str | None = "tiny",
        n_images: int = 2,
        num_inference_steps: int = 10,
        guidance_scale: float = 6.0,
        seed: int = 0,
        max_prompts: int | None = 4,
        best_of: int | None = None,
        zero_shot_prompts: list[str] | None = None,
        multi_prompts: list[str] | None = None,
        dino_path: str | None = None,
        resolution: int | None = None,
        enabled: bool = True,
        **kw: Any,
    ) -> None:
        unknown = sorted(set(kw) - set(KNOWN_EXTRA))
        if unknown:
            raise TypeError(
                f"eval: unknown key(s) {unknown}; known keys are the ContinualEvaluator arguments and {sorted(KNOWN_EXTRA)}"
            )
        if int(n_images) < 1:
            raise ValueError(f"eval.n_images={n_images}: must be >= 1")
        if best_of is not None and int(best_of) < 1:
            raise ValueError(f"eval.best_of={best_of}: must be >= 1 or null")
        opts = {**KNOWN_EXTRA, **kw}
        self.clip_path = clip_path
        self.clip_preset = clip_preset
        self.n_images = int(n_images)
        self.best_of = None if best_of is None else int(best_of)
        # best_of > n_images generates more samples per prompt; "mean" and "best" use the same ones.
        self.n_samples = max(self.n_images, self.best_of or 0)
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.seed = int(seed)
        self.max_prompts = None if max_prompts is None else int(max_prompts)
        self.zero_shot_prompts = list(zero_shot_prompts) if zero_shot_prompts is not None else default_zero_shot_prompts()
        self.multi_templates = list(multi_prompts) if multi_prompts is not None else list(DEFAULT_MULTI_PROMPTS)
        self.dino_path = dino_path
        self.resolution = None if resolution is None else int(resolution)
        self.enabled = bool(enabled)
        self.batch_size = int(opts["batch_size"])
        self.max_pairs = None if opts["max_pairs"] is None else int(opts["max_pairs"])
        self.thumbnail = int(opts["thumbnail"])
        self.generator_device = str(opts["generator_device"])
        self.clip_seed = int(opts["clip_seed"])
        self.write_report = bool(opts["write_report"])
        self.sampler = Sampler(str(opts["precision"]), bool(opts["compile"]), bool(opts["regional_compile"]))
        self._main = True  # rank 0 (or no torch.distributed): the only rank that writes files
        self.clip: ClipScorer | None = None
        self.dino: DinoScorer | None = None
        self.state: EvalState | None = None
        self.run_dir: Path | None = None
        self.concepts: list[Concept] = []
        self._refs: dict[str, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ setup
    def settings(self) -> dict[str, Any]:
        """What the numbers depend on (stored in the state and in results.json)."""
        return {
            "n_images": self.n_images,
            "best_of": self.best_of,
            "n_samples": self.n_samples,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "seed": self.seed,
            "max_prompts": self.max_prompts,
            "resolution": self.resolution,
            "zero_shot_prompts": self.zero_shot_prompts[: self.max_prompts] if self.max_prompts else self.zero_shot_prompts,
            "multi_prompts": self.multi_templates,
            "generator_device": self.generator_device,
            # the precision the images are sampled in on this device (bf16 moves ID more than CLIP: docs/evaluation.md)
            "sampler_precision": self.sampler.runs_in(getattr(self, "device", torch.device("cpu")))[0],
        }

    @property
    def state_path(self) -> Path:
        assert self.run_dir is not None, "call setup() first"
        return _eval_dir(self.run_dir) / "state.json"

    def setup(self, run_dir: Path, concepts: list[Concept], device) -> None:
        """Load CLIP (and DINO); continue ``run_dir/eval/state.json`` if a previous run left one."""
        self.run_dir = Path(run_dir)
        self.concepts = list(concepts)
        self.device = torch.device(device)
        self._main = is_main_rank()
        if not self.enabled:
            return
        self.clip = make_clip(self.clip_path, self.clip_preset, self.device, seed=self.clip_seed)
        self.dino = load_dino(self.dino_path, self.device) if self.dino_path else None
        names = [c.name for c in self.concepts]
        dino_name = self.dino.name if self.dino else None
        if self.state_path.exists():
            st = EvalState.load(self.state_path)
            self._check_resume(st, names, dino_name)
            if len(st.concepts) < len(names):  # the sequence was extended: grow the matrices
                st = self._grow(st, names)
            self.state = st
        else:
            self.state = EvalState.new(names, self.clip.name, self.settings(), dino_model=dino_name)

    def _check_resume(self, st: EvalState, names: list[str], dino_name: str | None) -> None:
        where = self.state_path
        if st.clip_model != self.clip.name:
            raise StateError(
                f"{where} was measured with CLIP {st.clip_model!r}, this run uses {self.clip.name!r}: the scores would "
                f"not be comparable. Set eval.clip_path/eval.clip_preset to match, or delete {where} to start afresh."
            )
        if st.dino_model != dino_name:
            raise StateError(f"{where} was measured with DINO {st.dino_model!r}, this run uses {dino_name!r}; match eval.dino_path or delete the file")
        if names[: len(st.concepts)] != st.concepts:
            raise StateError(
                f"{where} holds concepts {st.concepts}, this run's sequence is {names}: a resumed run must keep the order. "
                f"Use the original data.concepts, or another run folder, or delete {where}."
            )
        added = {"sampler_precision"}  # recorded since the shared sampler; states made before it lack it
        changed = {k: (st.settings.get(k), v) for k, v in self.settings().items()
                   if st.settings.get(k) != v and not (k in added and k not in st.settings)}
        if changed:
            warnings.warn(f"{where}: resuming with changed evaluation settings {changed}; earlier rows used the old ones")

    @staticmethod
    def _grow(st: EvalState, names: list[str]) -> EvalState:
        T0, T = len(st.concepts), len(names)
        for k, R in st.matrices.items():
            M = new_matrix(T)
            M[:T0, :T0] = R
            st.matrices[k] = M
        for k, v in st.zero_shot.items():
            st.zero_shot[k] = list(v) + [math.nan] * (T + 1 - len(v))
        st.concepts = list(names)
        return st

    def _require(self) -> EvalState:
        if self.state is None or self.clip is None:
            raise RuntimeError("ContinualEvaluator: call setup(run_dir, concepts, device) before evaluating")
        return self.state

    # ------------------------------------------------------------------ generation
    def use_sampler(self, sampler: Sampler) -> bool:
        """Sample with ``sampler`` (the run's prior sampler: its weight copy and compiled graphs
        reused) when its settings are this evaluator's; returns whether it was taken."""
        if sampler.settings() != self.sampler.settings():
            return False
        self.sampler = sampler
        return True

    def _resolution(self, pipe) -> int:
        return self.resolution or int(pipe.unet.config.sample_size * pipe.vae_scale_factor)

    def _sample(self, pipe, prompts: Sequence[str], idx: Sequence[int], jobs: Sequence[tuple[int, int]]) -> list[Image.Image]:
        """One image per job ``(j, k)``: sample k of prompt j with seed ``seed + 1000 idx[j] + k``."""
        sampler = self.sampler.bind(pipe)
        res = self._resolution(pipe)
        out: list[Image.Image] = []
        for b in range(0, len(jobs), self.batch_size):
            chunk = jobs[b : b + self.batch_size]
            gens = [torch.Generator(self.generator_device).manual_seed(self.seed + 1000 * idx[j] + k) for j, k in chunk]
            cond, uncond = sampler.embed([prompts[j] for j, _ in chunk])
            pixels = sampler.sample(cond, uncond, gens, self.num_inference_steps, self.guidance_scale, res, batch_size=self.batch_size)
            out += [Image.fromarray(px.numpy()) for px in pixels]
        return out

    def generate(self, pipe, prompts: Sequence[str], seed_index: Sequence[int] | None = None) -> list[list[Image.Image]]:
        """``n_samples`` images per prompt; sample k of prompt j uses seed + 1000 j + k.

        ``seed_index[j]`` replaces j in the seed (prompts of several groups share one batch while
        each keeps the noise of its own position), so every stage sees the same noise.
        """
        idx = list(range(len(prompts))) if seed_index is None else list(seed_index)
        jobs = [(j, k) for j in range(len(prompts)) for k in range(self.n_samples)]
        out: list[list[Image.Image]] = [[] for _ in prompts]
        for (j, _), im in zip(jobs, self._sample(pipe, prompts, idx, jobs)):
            out[j].append(im)
        return out

    def _embed_images(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        emb = {"clip": self.clip.image_embeddings(images)}
        if self.dino is not None:
            emb["dino"] = self.dino.image_embeddings(images)
        return emb

    def _thumb(self, image: Image.Image) -> Image.Image:
        im = image.copy()
        im.thumbnail((self.thumbnail, self.thumbnail))
        return im

    def sample_and_embed(self, pipe, prompts: Sequence[str], seed_index: Sequence[int]) -> tuple[dict[str, torch.Tensor], list[Image.Image]]:
        """The embeddings of every sample, ``{"clip": P x N x e, "dino": ...}``, and the first sample
        of every prompt as a thumbnail. Under ``torch.distributed`` rank r samples and embeds jobs
        r, r + world, ... and every rank receives all of them (``all_gather_object``)."""
        P, N = len(prompts), self.n_samples
        jobs = [(j, k) for j in range(P) for k in range(N)]
        rank, world = rank_and_world()
        mine = jobs[rank::world]
        images = self._sample(pipe, prompts, list(seed_index), mine) if mine else []
        emb = self._embed_images(images) if images else {}
        firsts = {j: self._thumb(im) for (j, k), im in zip(mine, images) if k == 0}
        parts = [(mine, emb, firsts)]
        if world > 1:
            import torch.distributed as dist

            parts = [None] * world
            dist.all_gather_object(parts, (mine, emb, firsts))
        out = {}
        for key in next(e for _, e, _ in parts if e):
            dim = next(e[key].shape[1] for _, e, _ in parts if e)
            grid = torch.empty(P, N, dim)
            for part_jobs, e, _ in parts:
                for (j, k), v in zip(part_jobs, e.get(key, [])):
                    grid[j, k] = v
            out[key] = grid
        thumbs: dict[int, Image.Image] = {}
        for _, _, f in parts:
            thumbs.update(f)
        return out, [thumbs[j] for j in range(P)]

    # ------------------------------------------------------------------ scoring
    def references(self, concept: Concept) -> dict[str, torch.Tensor]:
        """CLIP (and DINO) embeddings of the concept's reference images (cached)."""
        if concept.name not in self._refs:
            from ..images import load_image

            paths = concept.image_paths()
            if not paths:
                raise ValueError(f"concept {concept.name!r}: no reference images in {concept.folder()}; CLIP-I needs them")
            images = [load_image(p) for p in paths]
            refs = {"clip": self.clip.image_embeddings(images)}
            if self.dino is not None:
                refs["dino"] = self.dino.image_embeddings(images)
            self._refs[concept.name] = refs
            self._save_reference_thumbnail(concept.name, images[0])
        return self._refs[concept.name]

    def _save_reference_thumbnail(self, name: str, image: Image.Image) -> None:
        """The first reference image beside the samples (the report's sample grid shows it)."""
        path = _eval_dir(self.run_dir) / "samples" / "references" / f"{name}.png"
        if self._main and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            im = image.convert("RGB")
            im.thumbnail((self.thumbnail, self.thumbnail))
            im.save(path)

    def record_references(self, concepts: Sequence[Concept]) -> None:
        """Store each concept's reference self-similarity (CLIP-I and identity) in the state, once:
        the "learned" rule (``metrics.learned``) measures samples against it."""
        st = self._require()
        ref = st.base.setdefault("reference", {})
        for c in concepts:
            if c.name in ref.get("clip_i", {}):
                continue
            r = self.references(c)
            ref.setdefault("clip_i", {})[c.name] = self_similarity(r["clip"])
            if "dino" in r:
                ref.setdefault("dino", {})[c.name] = self_similarity(r["dino"])

    def score(self, prompts: Sequence[EvalPrompt], images: list[list[Image.Image]]) -> dict[str, Any]:
        """Scores of generated images: ``clip_t`` always, ``clip_i``/``dino`` when prompts name concepts.

        Returns ``{metric: mean over all samples, metric + "_best": mean over prompts of the best
        sample, "prompts": per-prompt details}``. CLIP-T uses ``prompt.clip_text`` (no tokens);
        multi-concept CLIP-I is the mean over the prompt's concepts.
        """
        P, N = len(prompts), self.n_samples
        flat = [im for ims in images for im in ims]
        return self.score_embeddings(prompts, {k: v.reshape(P, N, -1) for k, v in self._embed_images(flat).items()})

    def score_embeddings(self, prompts: Sequence[EvalPrompt], emb: dict[str, torch.Tensor]) -> dict[str, Any]:
        """``score`` from the samples' embeddings (``{"clip": P x N x e, "dino": ...}``)."""
        by_name = {c.name: c for c in self.concepts}
        P, N = len(prompts), self.n_samples
        img = emb["clip"]
        txt = self.clip.text_embeddings([p.clip_text for p in prompts])
        per: dict[str, torch.Tensor] = {"clip_t": torch.stack([clip_text_score(img[j], txt[j].expand(N, -1)) for j in range(P)])}
        if all(p.concepts for p in prompts):
            per["clip_i"] = torch.stack(
                [
                    torch.stack([per_image_similarity(img[j], self.references(by_name[c])["clip"]) for c in p.concepts]).mean(0)
                    for j, p in enumerate(prompts)
                ]
            )
            if self.dino is not None:
                dimg = emb["dino"]
                per["dino"] = torch.stack(
                    [
                        torch.stack([per_image_similarity(dimg[j], self.references(by_name[c])["dino"]) for c in p.concepts]).mean(0)
                        for j, p in enumerate(prompts)
                    ]
                )
        out: dict[str, Any] = {}
        for key, s in per.items():  # s: P x N
            out[key] = float(s.mean())
            out[key + "_best"] = float(s.max(dim=1).values.mean())
        out["prompts"] = [
            {"prompt": p.generate, "clip_text": p.clip_text, **{k: per[k][j].tolist() for k in per}} for j, p in enumerate(prompts)
        ]
        return out

    def _save_samples(self, folder: str, key: str, firsts: list[Image.Image]) -> list[str]:
        """The first sample of every prompt (thumbnails) as small PNGs (rank 0 writes them);
        returns paths relative to run_dir."""
        d = _eval_dir(self.run_dir) / "samples" / folder
        if self._main:
            d.mkdir(parents=True, exist_ok=True)
        rel = []
        for j, im in enumerate(firsts):
            path = d / f"{key}_p{j:02d}.png"
            if self._main:
                self._thumb(im).save(path)
            rel.append(str(path.relative_to(self.run_dir)))
        return rel

    def _evaluate_groups(self, pipe, groups: list[tuple[list[EvalPrompt], str]], folder: str) -> dict[str, dict[str, Any]]:
        """Generate the groups' prompts in shared batches, score and save each group.

        Groups go in waves of about 16 batches, so few batches are partly empty and at most a wave
        of images is held in memory (the paper's protocol makes thousands per stage).
        """
        out: dict[str, dict[str, Any]] = {}
        wave: list[tuple[list[EvalPrompt], str]] = []
        limit = 16 * self.batch_size
        for g in groups:
            wave.append(g)
            if sum(len(p) for p, _ in wave) * self.n_samples >= limit:
                out.update(self._evaluate_wave(pipe, wave, folder))
                wave = []
        if wave:
            out.update(self._evaluate_wave(pipe, wave, folder))
        return out

    def _evaluate_wave(self, pipe, groups: list[tuple[list[EvalPrompt], str]], folder: str) -> dict[str, dict[str, Any]]:
        flat = [p for prompts, _ in groups for p in prompts]
        index = [j for prompts, _ in groups for j in range(len(prompts))]
        emb, firsts = self.sample_and_embed(pipe, [p.generate for p in flat], index)
        out, start = {}, 0
        for prompts, key in groups:
            part = slice(start, start + len(prompts))
            start += len(prompts)
            res = self.score_embeddings(prompts, {k: v[part] for k, v in emb.items()})
            res["samples"] = self._save_samples(folder, key, firsts[part])
            out[key] = res
        return out

    # ------------------------------------------------------------------ the protocol
    def before_training(self, pipe) -> dict[str, float]:
        """Stage 0: zero-shot CLIP-T, and per concept the base model on its class prompts (no token).

        ``pipe`` must be the base model. Only what the state lacks is measured: nothing on a resumed
        run, the new concepts' base scores on a sequence extended after it finished."""
        if not self.enabled:
            return {}
        st = self._require()
        keys = ("clip_i", "clip_t", "clip_i_best", "clip_t_best") + (("dino", "dino_best") if self.dino else ())
        missing = [c for c in self.concepts if c.name not in st.base.get("clip_i", {})]
        with_zero_shot = "zero_shot_clip_t" not in st.base
        if not missing and not with_zero_shot:
            return self._base_metrics()
        base: dict[str, Any] = {**st.base, **{k: dict(st.base.get(k, {})) for k in keys}}
        samples: dict[str, list[str]] = dict(st.samples.get("0", {}))
        details: dict[str, Any] = {}
        groups = [(single_prompts(c, self.max_prompts, with_token=False), c.name) for c in missing]
        if with_zero_shot:
            groups.append((zero_shot(self.zero_shot_prompts, self.max_prompts), "zero_shot"))
        res_all = self._evaluate_groups(pipe, groups, "stage_00")
        for c in missing:
            res = res_all[c.name]
            for k in keys:
                base[k][c.name] = res[k]
            samples[c.name] = res["samples"]
            details[c.name] = res["prompts"]
        if with_zero_shot:
            zs = res_all["zero_shot"]
            samples["zero_shot"] = zs["samples"]
            details["zero_shot"] = zs["prompts"]
            base["zero_shot_clip_t"] = zs["clip_t"]
            base["zero_shot_clip_t_best"] = zs["clip_t_best"]
            st.zero_shot["mean"][0] = zs["clip_t"]
            st.zero_shot["best"][0] = zs["clip_t_best"]
        st.base = base
        self.record_references(missing)
        st.samples["0"] = samples
        self._save_details(0, details, merge=True)
        self._save_state()
        return self._base_metrics()

    def _base_metrics(self) -> dict[str, float]:
        b = self.state.base
        out = {f"eval/base/{k}/{n}": v for k in ("clip_i", "clip_t", "dino") for n, v in b.get(k, {}).items()}
        if "zero_shot_clip_t" in b:
            out["eval/zero_shot_clip_t"] = b["zero_shot_clip_t"]
            out["eval/zero_shot_clip_t_best"] = b["zero_shot_clip_t_best"]
        return out

    def after_stage(self, pipe, stage: int, learned: list[Concept]) -> dict[str, float]:
        """Stage ``stage`` (1-based): score every learned concept; fill row ``stage`` of the matrices."""
        if not self.enabled:
            return {}
        st = self._require()
        names = [c.name for c in learned]
        if not 1 <= stage <= st.n:
            raise ValueError(f"after_stage(stage={stage}): stages are 1..{st.n} for a sequence of {st.n} concepts")
        if names != st.concepts[:stage]:
            raise ValueError(
                f"after_stage(stage={stage}) got concepts {names}; expected the first {stage} of the sequence {st.concepts}"
            )
        row = stage - 1
        samples: dict[str, list[str]] = {}
        details: dict[str, Any] = {}
        groups = [(single_prompts(c, self.max_prompts), c.name) for c in learned]
        groups.append((zero_shot(self.zero_shot_prompts, self.max_prompts), "zero_shot"))
        res_all = self._evaluate_groups(pipe, groups, f"stage_{stage:02d}")
        self.record_references(learned)  # states made before it was recorded, or grown sequences
        for i, c in enumerate(learned):
            res = res_all[c.name]
            for k, M in st.matrices.items():
                M[row, i] = res[k]
            samples[c.name] = res["samples"]
            details[c.name] = res["prompts"]
        zs = res_all["zero_shot"]
        samples["zero_shot"] = zs["samples"]
        st.zero_shot["mean"][stage] = zs["clip_t"]
        st.zero_shot["best"][stage] = zs["clip_t_best"]
        st.samples[str(stage)] = samples
        if stage not in st.stages_done:
            st.stages_done.append(stage)
        self._save_details(stage, {**details, "zero_shot": zs["prompts"]})
        self._save_state()
        if self.write_report and self._main:
            from .report import write_report

            write_report(self.run_dir, st)
        return self.stage_metrics(stage)

    def is_evaluated(self, stage: int) -> bool:
        """Whether row ``stage`` is already in the state (a resumed run can re-evaluate the last stage)."""
        return self.enabled and self.state is not None and stage in self.state.stages_done

    def stage_metrics(self, stage: int) -> dict[str, float]:
        """Flat metrics of one evaluated stage, for the loggers."""
        st = self._require()
        row = stage - 1
        out: dict[str, float] = {"eval/stage": float(stage)}
        for k, M in st.matrices.items():
            for i, n in enumerate(st.concepts[:stage]):
                out[f"eval/{k}/{n}"] = float(M[row, i])
            out[f"eval/{k}"] = float(np.mean(M[row, :stage]))
        for key in ("clip_i", "dino"):
            for i, n in enumerate(st.concepts[:stage]):
                base = st.base.get(key, {}).get(n)
                if base is not None and key in st.matrices:
                    out[f"eval/{key}_gain/{n}"] = float(st.matrices[key][row, i] - base)
        out["eval/zero_shot_clip_t"] = st.zero_shot["mean"][stage]
        out["eval/zero_shot_clip_t_best"] = st.zero_shot["best"][stage]
        if stage >= 2 and last_stage(st.matrices["clip_i"]) == stage:
            out["eval/forgetting/clip_i"] = forgetting(st.matrices["clip_i"])
            out["eval/bwt/clip_i"] = backward_transfer(st.matrices["clip_i"])
        return out

    def finish(self, pipe, concepts: list[Concept]) -> dict:
        """Multi-concept prompts over pairs of learned concepts; writes eval/results.json and report.md."""
        if not self.enabled:
            return {}
        st = self._require()
        T = last_stage(st.matrices["clip_i"])
        learned = [c for c in concepts if c.name in st.concepts[:T]]
        pairs = list(itertools.combinations(learned, 2))
        if self.max_pairs is not None:
            pairs = pairs[: self.max_pairs]
        if pairs:
            groups = [(multi_prompts(a, b, self.multi_templates, self.max_prompts), f"{a.name}+{b.name}") for a, b in pairs]
            res_all = self._evaluate_groups(pipe, groups, "multi")
            rows = []
            for (a, b), (_, key) in zip(pairs, groups):
                res = res_all[key]
                rows.append({"concepts": [a.name, b.name], **{k: v for k, v in res.items() if k != "prompts"}, "prompts": res["prompts"]})
            keys = [k for k in rows[0] if k not in ("concepts", "prompts", "samples")]
            st.multi = {k: float(np.mean([r[k] for r in rows])) for k in keys}
            st.multi["pairs"] = rows
            st.multi["after_stage"] = T
        self._save_state()
        results = results_from_state(st)
        if self._main:
            atomic_write_json(_eval_dir(self.run_dir) / "results.json", results)
            from .report import write_report

            write_report(self.run_dir, st)
        return results

    # ------------------------------------------------------------------ logging payloads
    def stage_tables(self) -> dict[str, tuple[list[str], list[list]]]:
        """The forgetting matrices as (columns, rows) tables: one row per stage."""
        st = self._require()
        out = {}
        for k in [k for k in ("clip_i", "clip_t", "dino") if k in st.matrices]:
            M = st.matrices[k]
            cols = ["stage"] + st.concepts
            rows = [[t + 1] + [None if math.isnan(v) else round(float(v), 4) for v in M[t]] for t in range(last_stage(M))]
            out[f"forgetting/{k}"] = (cols, rows)
        return out

    def stage_images(self, stage: int | None = None) -> dict[str, Image.Image]:
        """The sample grid so far (rows = concepts, columns = stages), for the loggers."""
        from .report import sample_grid

        st = self._require()
        grid = sample_grid(self.run_dir, st, upto=stage)
        return {"samples/grid": grid} if grid is not None else {}

    def _save_details(self, stage: int, details: dict[str, Any], merge: bool = False) -> None:
        """Per-prompt, per-sample scores of one stage (for inspection; not needed to resume);
        ``merge``: add to the file's entries (stage 0 of an extended sequence). Rank 0 only."""
        if not self._main:
            return
        path = _eval_dir(self.run_dir) / "details" / f"stage_{stage:02d}.json"
        if merge and path.is_file():
            import json

            try:
                details = {**json.loads(path.read_text(encoding="utf-8")), **details}
            except (OSError, ValueError):
                pass
        atomic_write_json(path, details)

    def _save_state(self) -> None:
        """``eval/state.json`` (rank 0 only: every rank holds the same state)."""
        if self._main:
            self.state.save(self.state_path)
