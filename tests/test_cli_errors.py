"""Config mistakes and bad input through ``python -m cns_lightning``: each stops before anything is
written, names the key and the fix (the valid choices where there is a list), prints no Python
traceback, exits non-zero, and leaves a finished run in the same folder untouched."""

from __future__ import annotations

import hashlib

import pytest

from conftest import FAST, concepts_override, make_concept_folder, run_cli


def files(run) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-concept run: its folder, its command, the environment."""
    import os

    root = tmp_path_factory.mktemp("finished")
    folder = make_concept_folder(root / "data" / "teddy", n=3)
    env = dict(os.environ, CNS_CACHE=str(root / "cache"), CNS_OUTPUT=str(root / "out"), WANDB_MODE="offline", HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1")
    args = [concepts_override([folder], ("teddy bear",)), *FAST]
    run_cli(args, env)
    return root / "out" / "default" / "cns" / "seed0", args, env, folder


CONCEPT = "data.concepts=[{name:teddy,class_name:'teddy bear',path:'FOLDER',EXTRA}]"
CASES = {
    # override(s) -> what stderr must say
    "logger_typo": (["logger=wanb"], ["Could not find 'logger/wanb'", "wandb", "tensorboard"]),
    "eval_typo": (["eval=fsat"], ["Could not find 'eval/fsat'", "fast", "paper"]),
    "concept_key_tokn": ([CONCEPT.replace("EXTRA", "tokn:'<t1>'")], ["data.concepts[0].tokn is not a concept key (did you mean token?)", "class_name"]),
    "concept_key_catgory": ([CONCEPT.replace("EXTRA", "catgory:object")], ["data.concepts[0].catgory is not a concept key (did you mean category?)"]),
    "num_prompts_negative": (["calibration.num_prompts=-1"], ["calibration.num_prompts=-1 (int): expected a whole number >= 1", "calibration.num_prompts=20"]),
    "num_prompts_zero": (["calibration.num_prompts=0"], ["calibration.num_prompts=0 (int): expected a whole number >= 1"]),
    "concepts_a_string": (["data.concepts=/data/teddy"], ["data.concepts='/data/teddy' is not a list of concepts", "data.concepts=[{name:"]),
    "device_missing": (["device=cuda:99"], ["device='cuda:99', but this machine has", "Fix: device=auto"]),
    "logger_target_typo": (["logger.csv._target_=lightning.pytorch.loggers.CSVLoger"],
                           ["logger.csv._target_='lightning.pytorch.loggers.CSVLoger' cannot be imported", "logger=none"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_config_mistake_fails_first_and_cleanly(finished, case):
    run, args, env, folder = finished
    before = files(run)
    extra, expected = CASES[case]
    extra = [e.replace("FOLDER", str(folder)) for e in extra]
    cmd = [a for a in args if not (a.startswith("data.concepts=") and any(e.startswith("data.concepts=") for e in extra))] + extra
    proc = run_cli(cmd, env, check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for text in expected:
        assert text in proc.stderr, (text, proc.stderr[-3000:])
    assert files(run) == before, "a refused command changed the finished run's files"
    if case in ("concept_key_tokn", "device_missing", "logger_target_typo"):  # found inside the run (Hydra's own are found before it): for a new run folder, no folder is left behind
        proc = run_cli([*cmd, "name=fresh"], env, check=False)
        assert proc.returncode == 1 and not (run.parents[2] / "fresh").exists()  # nor its empty parents


def test_a_resolution_the_model_cannot_encode_names_the_field(finished):
    run, args, env, _ = finished
    proc = run_cli([*args, "model.resolution=33", "name=res33"], env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "model.resolution=33 is not a multiple of 8, the VAE scale factor of model 'tiny'" in proc.stderr
    assert "Fix: model.resolution=32" in proc.stderr
