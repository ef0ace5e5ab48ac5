"""The package as a user installs it: a wheel built from the project, installed (not editable) into
a fresh venv, run with ``python -m cns_lightning`` from a folder that is not the repository. The
configs must come from inside the installed package; ``--config-dir`` adds the user's own.

Offline: the fresh venv is made with ``--without-pip`` and reaches the already installed
dependencies (torch, lightning, ...) through a ``.pth`` line naming this environment's
site-packages. A ``.pth`` line only appends a folder to ``sys.path``; the ``.pth`` files inside that
folder (the editable install of the repository, if any) are not processed, so the only
``cns_lightning`` the fresh venv can import is the wheel's.
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import FAST, ROOT, concepts_override, make_concept_folder


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel of a copy of the project's sources (pyproject.toml, README.md, src/): the repository
    itself gets no build/ or egg-info folders."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist), str(project)],
                   check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = dist.glob("cns_lightning-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path) -> Path:
    """A venv with no packages of its own; this environment's site-packages appended to its path."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = [p for p in dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]) if Path(p).is_dir()]
    Path(purelib, "_parent_env.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


def _clean_env(env: dict) -> dict:
    e = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return e


def test_wheel_installs_and_runs_from_another_folder_with_a_user_config_dir(tmp_path, env):
    wheel = _build_wheel(tmp_path)
    names = subprocess.run([sys.executable, "-m", "zipfile", "-l", str(wheel)], check=True, capture_output=True, text=True).stdout
    assert "cns_lightning/conf/config.yaml" in names and "cns_lightning/conf/experiment/seq7.yaml" in names

    python = _fresh_venv(tmp_path)
    env = _clean_env(env)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True, env=env, timeout=600)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import cns_lightning, sys; print(cns_lightning.__file__)"],
                           cwd=elsewhere, env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(python.parent.parent), f"imported {where}, not the wheel in {python.parent.parent}"

    # the user's own config folder: an experiment of theirs that builds on the shipped groups
    user = tmp_path / "my_configs" / "experiment"
    user.mkdir(parents=True)
    (user / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - override /model: tiny\nname: mine\ntag: _own\n")
    data = make_concept_folder(tmp_path / "data" / "teddy", n=2, seed=0)
    args = ["--config-dir", str(tmp_path / "my_configs"), "+experiment=mine", concepts_override([data]), *FAST, "method.steps=2"]
    proc = subprocess.run([str(python), "-m", "cns_lightning", *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    run = Path(env["CNS_OUTPUT"]) / "mine" / "cns_own" / "seed0"
    assert (run / "stages" / "01_teddy" / "kv.safetensors").is_file()
    assert "Primary config directory not found" not in proc.stderr

    # the console script composes too (Hydra would look for a module cns_lightning.conf with a relative config_path)
    proc = subprocess.run([str(python.parent / "cns-lightning"), "--cfg", "job", "+experiment=seq7"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "micro_pipeline" in proc.stdout
