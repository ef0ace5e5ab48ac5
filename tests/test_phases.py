"""phases.py: the seconds of each phase, with torch.compile's compiler time moved to `compile`;
speedups.use_compile_cache: Inductor's caches under the project's cache folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from cns_lightning.phases import PHASES, PhaseTimer, compile_seconds
from cns_lightning.speedups import use_compile_cache


def test_compile_seconds_move_out_of_the_phase_that_paid_them():
    timer = PhaseTimer()
    with timer.phase("priors"):
        time.sleep(0.05)
    before = compile_seconds()
    with timer.phase("training"):
        f = torch.compile(lambda x: torch.sin(x) * 2 + x.cos(), backend="eager", dynamic=False)
        f(torch.randn(7))
    spent = compile_seconds() - before
    assert spent > 0  # Dynamo traced the function
    s = timer.summary()
    assert set(s) == {*PHASES, "total"}
    assert s["compile"] == pytest.approx(spent, abs=1e-3)
    assert s["priors"] >= 0.05 and s["training"] >= 0
    assert s["total"] == pytest.approx(sum(s[k] for k in PHASES), abs=1e-2)
    with pytest.raises(ValueError, match="unknown phase 'compile'"):
        with timer.phase("compile"):
            pass


def test_the_compile_cache_lives_under_the_projects_cache_folder(tmp_path):
    """A fresh process: use_compile_cache points TORCHINDUCTOR_CACHE_DIR into <cache>/compile,
    unless the user set it already."""
    code = (
        "import os, sys; from cns_lightning.speedups import use_compile_cache;"
        "from torch._inductor.runtime.cache_dir_utils import cache_dir;"
        "print(use_compile_cache(sys.argv[1])); print(cache_dir())"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(tmp_path / "cache" / "compile")] * 2
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "mine")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(tmp_path / "mine")] * 2
