"""bf16 against fp32 evaluation: how far the sampler's precision moves the scores (issue 18, item 4).

    python experiments/eval_precision.py +experiment=seq7 eval.n_images=4                       # micro world
    python experiments/eval_precision.py +experiment=seq7 model=tiny eval.clip_path=null eval.dino_path=null eval.n_images=4   # tiny

Any argument is a Hydra override of the project's config. Builds the run's base pipeline with its
concepts' tokens and runs the evaluation of the base model (``ContinualEvaluator.before_training``:
every concept's prompts without the token, and the zero-shot prompts) twice with the same seeds:
with the fp32 sampler and with the bf16 one (``sampling.Sampler(..., on_cpu=True)``: the bf16
copy the GPU samples with, run here on the CPU). Prints, per metric, the largest and the mean
absolute difference over the concepts (and zero-shot), and the difference of the means; and, for
scale, the same for fp32 with the next evaluation seed (``eval.seed`` + 1: other noise, what the
sampling itself varies by).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

import cns_lightning.__main__  # noqa: E402,F401  (registers the config's ${micro_asset:...} resolver)

from cns_lightning.concepts import concepts_from_config  # noqa: E402
from cns_lightning.sampling import Sampler  # noqa: E402
from cns_lightning.tokens import add_concept_tokens  # noqa: E402


def main() -> None:
    overrides = sys.argv[1:]
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(ROOT / "src" / "cns_lightning" / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    cache = str(Path(cfg.paths.cache_dir).expanduser())
    torch.manual_seed(0)
    pipe = instantiate(cfg.model)
    concepts = concepts_from_config(cfg.data.concepts)
    for c in concepts:
        c.image_paths(cache)  # micro-world concepts render their images into the cache
    add_concept_tokens(pipe.tokenizer, pipe.text_encoder, concepts)
    base = {}
    out = Path(f"/tmp/eval_precision_{time.time_ns()}")
    for precision in ("fp32", "bf16", "fp32_seed+1"):
        ev = instantiate(cfg.eval)
        ev.sampler = Sampler(precision.split("_")[0], on_cpu=True)
        ev.seed += precision.endswith("+1")
        ev.setup(out / precision, concepts, "cpu")
        t0 = time.perf_counter()
        ev.before_training(pipe)
        base[precision] = (ev.state.base, time.perf_counter() - t0)
    (a, ta), (b, tb), (c, _) = base["fp32"], base["bf16"], base["fp32_seed+1"]
    print(f"\neval_precision on CPU (torch {torch.__version__}); model {cfg.model.name}; CLIP {ev.clip.name}; "
          f"{ev.n_samples} samples per prompt, {ev.num_inference_steps} steps, guidance {ev.guidance_scale}, "
          f"{len(concepts)} concepts; fp32 {ta:.1f} s, bf16 {tb:.1f} s; overrides: {' '.join(overrides) or '-'}\n")
    print("| metric | fp32 mean | bf16 mean | bf16 - fp32: max abs diff (per concept) | mean abs diff | fp32, seed+1 - seed: max abs diff | mean abs diff |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for key in [k for k in a if isinstance(a[k], dict) and k != "reference"]:  # reference: the same images both times
        x = np.array([a[key][n] for n in a[key]])
        y = np.array([b[key][n] for n in a[key]])
        z = np.array([c[key][n] for n in a[key]])
        print(f"| {key} | {x.mean():.3f} | {y.mean():.3f} | {np.abs(x - y).max():.3f} | {np.abs(x - y).mean():.3f} | "
              f"{np.abs(x - z).max():.3f} | {np.abs(x - z).mean():.3f} |")
    for key in ("zero_shot_clip_t", "zero_shot_clip_t_best"):
        if key in a:
            print(f"| {key} | {a[key]:.3f} | {b[key]:.3f} | {abs(a[key] - b[key]):.3f} | | {abs(a[key] - c[key]):.3f} | |")


if __name__ == "__main__":
    main()
