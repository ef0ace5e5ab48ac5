"""SIGKILL at many points of a run, restart with the same command: the result is bit-identical.

One uninterrupted reference run goes through the real CLI (``python -m cns_lightning``). The
interrupted run then starts the same command again and again and is SIGKILLed each time:

* at random delays (seeded): wherever the run happens to be (model build, prior images,
  calibration, training ...); a ``faulthandler`` stack dump just before the kill names the phase;
* at chosen points, so that every phase is hit even where it lasts milliseconds: inside neuron
  selection, at a training step, between the files of a stage being saved, after a stage's
  manifest but before its folder is renamed, during evaluation.

To start in a fraction of a second instead of ~5 s of imports, those attempts run the CLI's entry
point (``cns_lightning.__main__.main`` with the same ``sys.argv``) in processes forked from a
multiprocessing forkserver that has the package imported. The chosen points are reached by
wrapping a function of the loop so that it kills its own process at that moment (``os.kill(
getpid(), SIGKILL)``: nothing is cleaned up); the code under test runs unchanged. The last attempt
is the real CLI again, without any wrapper.

Checked: >= 10 kills, in every phase; stages, once complete, are never rewritten (manifest mtime
and hashes); a ``.partial`` stage left by a kill is removed and redone; the final kv/token/mask
files are byte-identical to the reference run.
"""

from __future__ import annotations

import faulthandler
import hashlib
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

from conftest import FAST, concepts_override, make_concept_folder, run_cli

STAGE_FILES = ("kv.safetensors", "masks.safetensors", "token.safetensors")
NAMES = ("teddy", "mug")
# a few training steps and a small evaluation, so every phase is present but short
ARGS_EXTRA = [
    "method.steps=4",  # the "train" kill point picks one of these steps
    "eval.n_images=1",
    "eval.num_inference_steps=2",
    "eval.max_prompts=1",
    "eval.write_report=false",
    "eval.max_pairs=1",
]


# ---------------------------------------------------------------- child side (in the forked process)
def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _wrap(owner, attr: str, nth: int, when: str) -> None:
    """Make ``owner.attr`` SIGKILL the process at its ``nth`` call, ``before`` or ``after`` it runs."""
    original = getattr(owner, attr)
    calls = [0]

    def wrapper(*a, **k):
        calls[0] += 1
        if calls[0] == nth and when == "before":
            _kill_self()
        out = original(*a, **k)
        if calls[0] == nth and when == "after":
            _kill_self()
        return out

    setattr(owner, attr, wrapper)


def install_kill_point(point: tuple) -> None:
    from cns_lightning import state
    from cns_lightning.methods.cns import CNS
    from cns_lightning.module import ContinualModule

    kind, nth = point
    if kind == "select":  # masks computed, not yet registered
        _wrap(CNS, "select", nth, "after")
    elif kind == "train":  # at step nth of the first fit of this process
        _wrap(ContinualModule, "training_step", nth, "before")
    elif kind == "save":  # nth of the stage's 3 tensor files written, no manifest
        _wrap(state, "save_tensors", nth, "after")
    elif kind == "manifest":  # manifest written in <stage>.partial, folder not yet renamed
        _wrap(state, "write_manifest", nth, "after")
    elif kind == "eval":  # in the evaluation of the nth stage of this process: images made, scoring
        from cns_lightning.evaluation.protocol import ContinualEvaluator

        original, calls = ContinualEvaluator.after_stage, [0]

        def after_stage(self, *a, **k):
            calls[0] += 1
            if calls[0] == nth:
                _wrap(self, "score_embeddings", 1, "before")  # images made and embedded, scores not yet
            return original(self, *a, **k)

        ContinualEvaluator.after_stage = after_stage



def cli_child(args: list[str], env: dict, point: tuple | None, stack_path: str, log_path: str) -> None:
    """The CLI's entry point with ``args``, as ``python -m cns_lightning *args`` would run it."""
    os.environ.clear()
    os.environ.update(env)
    log = open(log_path, "a")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    stack = open(stack_path, "w")
    faulthandler.register(signal.SIGWINCH, file=stack, all_threads=False)  # Lightning resets SIGUSR1
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 does for the CLI runs
    if point is not None:
        install_kill_point(point)
    sys.argv = ["cns_lightning", *args]
    from cns_lightning.__main__ import main

    main()


# ---------------------------------------------------------------- test side
# what the loop (the innermost function of continual.py on the stack) was calling -> phase
PHASES = {
    "instantiate": "model build", "build_random_pipeline": "model build", "add_concept_tokens": "tokens",
    "check_token_in_captions": "tokens", "check_concept_inputs": "input checks", "check_config_values": "input checks",
    "build_method": "input checks", "check_outputs_fit": "disk check", "prior_images": "prior images",
    "calibration_prompts": "calibration", "completed_stages": "restore", "load": "restore", "setup": "restore",
    "make_evaluator": "evaluation", "before_training": "evaluation", "after_stage": "evaluation", "evaluate": "evaluation", "finish": "evaluation",
    "begin_stage": "selection", "fit_stage": "training", "fit": "training", "end_stage": "saving", "write_stage": "saving", "save_json": "saving",
    "ranks_agree": "saving", "atomic_write_bytes": "writing config.yaml", "check_run_folder": "run folder check",
    "warn_words_it_cannot_draw": "input checks", "validation_callback": "training", "say": "console", "final_message": "console",
}


def phase_of(dump: str) -> str:
    """The phase a faulthandler stack dump (most recent call first) shows the run in."""
    frames = [line.rsplit(" in ", 1)[-1] for line in dump.splitlines() if line.startswith("  File ")]
    files = [line for line in dump.splitlines() if line.startswith("  File ")]
    for k, line in enumerate(files):
        if "cns_lightning/continual.py" in line:
            callee = [f for f in frames[:k] if f not in ("decorate_context", "wrapper", "_fn", "inner")]
            return PHASES.get(callee[-1], f"run: {callee[-1]}") if callee else f"run: {frames[k]}"
    return "Hydra startup" if dump.strip() else "process start"


def snapshot(run: Path) -> dict[str, tuple[int, str]]:
    """Complete stages: manifest mtime and a hash over the stage's tensor files."""
    out = {}
    for s in sorted((run / "stages").glob("*")):
        if (s / "manifest.json").is_file() and not s.name.endswith(".partial"):
            h = hashlib.sha256(b"".join((s / f).read_bytes() for f in STAGE_FILES if (s / f).is_file()))
            out[s.name] = ((s / "manifest.json").stat().st_mtime_ns, h.hexdigest())
    return out


def final_files(run: Path) -> dict[str, bytes]:
    return {f"{s.name}/{f}": (s / f).read_bytes() for s in sorted((run / "stages").iterdir()) for f in STAGE_FILES}


def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path):
    dirs = [make_concept_folder(tmp_path / "data" / n, n=3, seed=k) for k, n in enumerate(NAMES)]
    args = [concepts_override(dirs), *FAST, *ARGS_EXTRA, "eval.enabled=true"]
    # one torch thread: tiny models on a shared 2-core machine run many times faster (OpenMP
    # threads spin-wait for each other when the cores are busy); both runs use the same setting
    base = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1")

    ref_env = dict(base, CNS_CACHE=str(tmp_path / "cache_ref"), CNS_OUTPUT=str(tmp_path / "ref"))
    t0 = time.time()
    run_cli(args, ref_env)
    ref_seconds = time.time() - t0
    reference = final_files(tmp_path / "ref" / "default" / "cns" / "seed0")
    assert len(reference) == len(NAMES) * len(STAGE_FILES)

    # own cache: the interrupted run generates its prior images itself (and may be killed doing it)
    env = dict(base, CNS_CACHE=str(tmp_path / "cache"), CNS_OUTPUT=str(tmp_path / "out"))
    run = tmp_path / "out" / "default" / "cns" / "seed0"
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["cns_lightning.__main__", "cns_lightning.continual", "cns_lightning.evaluation.protocol", "test_interrupt"])

    rng = random.Random(1234)
    # Each attempt advances the run by at most one stage, so that it is still unfinished after
    # every kill: chosen points in the first stage an attempt trains ("train": a random step,
    # "save": after a random one of the 3 tensor files), and "async" kills from outside after a
    # random delay up to the time an attempt needs to reach selection (model build, prior images,
    # tokens, calibration, restore, evaluation of the base model, selection).
    # "eval" kills while stage 1 is being evaluated (stage 1 saved: the one step forward).
    # (The first attempt also makes the prior images and evaluates the base model: the second
    # "select" measures how long a restart takes to reach selection.)
    plan = ["select", "train", "select", "async", "save", "async", "manifest", "async", "eval",
            "select", "async", "train", "save", "async", "manifest"]
    kills: list[tuple[str, str, list[str]]] = []
    seen: dict[str, tuple[int, str]] = {}
    partial_seen = False
    to_select = None  # seconds an attempt needed to reach selection, last measured
    for i, kind in enumerate(plan):
        stack, log = tmp_path / f"stack{i}.txt", tmp_path / f"log{i}.txt"
        # "async" has a backstop at selection: a restart that runs faster than the one measured
        # (a busy machine going quiet) must still not complete a stage
        point = {"async": ("select", 1), "train": ("train", rng.randint(1, 4)), "save": ("save", rng.randint(1, 3))}.get(kind, (kind, 1))
        p = ctx.Process(target=cli_child, args=(args, env, point, str(stack), str(log)))
        t_start = time.time()
        p.start()
        backstop = False
        if kind == "async":
            p.join(rng.uniform(0.05, 0.9 * to_select))
            backstop = not p.is_alive()  # it reached selection before the timer
            if p.is_alive():
                os.kill(p.pid, signal.SIGWINCH)  # stack dump: where was it?
                time.sleep(0.05)
                p.kill()
        p.join(300)
        assert p.exitcode is not None, f"attempt {i} hung"
        assert p.exitcode == -signal.SIGKILL, f"attempt {i} ({kind}) ended with {p.exitcode} instead of being killed:\n{log.read_text()[-4000:]}"
        if kind == "select":
            to_select = time.time() - t_start
        # a kill that lands before the child opened its dump file is a kill at process start
        where = ("selection" if backstop else phase_of(stack.read_text() if stack.exists() else "")) if kind == "async" else {
            "select": "selection", "train": "training", "save": "saving", "manifest": "saving", "eval": "evaluation",
        }[kind]
        now = snapshot(run)
        for name, value in seen.items():
            assert now.get(name) == value, f"after attempt {i}: completed stage {name} was rewritten or lost"
        partial_seen = partial_seen or bool(list((run / "stages").glob("*.partial")))
        seen.update(now)
        kills.append((kind if kind in ("async", "select", "manifest", "eval") else f"{kind}{point[1]}", where, sorted(now)))
        print(f"attempt {i:2d} {kills[-1][0]:9s} killed after {time.time() - t_start:5.1f}s in {where}", flush=True)

    # the same command, through the real CLI, finishes the run
    proc = run_cli(args, env)
    report = "\n".join(f"  {k:9s} -> {w:13s} complete: {', '.join(s) or '-'}" for k, w, s in kills)
    print(f"{len(kills)} kills; reference run {ref_seconds:.1f}s:\n{report}")
    assert "resuming" in proc.stdout + proc.stderr
    assert len(kills) >= 10
    assert {"selection", "training", "saving", "evaluation"} <= {w for _, w, _ in kills}, report
    assert partial_seen, "no kill left a half-written stage folder"
    assert list(seen) == ["01_teddy"], report  # stage 1 completed during the kills, stage 2 by the final run
    assert not list((run / "stages").glob("*.partial"))
    final = snapshot(run)
    for name, value in seen.items():
        assert final[name] == value, f"completed stage {name} was retrained"
    assert final_files(run) == reference, "the interrupted-and-resumed run differs from the uninterrupted one"
