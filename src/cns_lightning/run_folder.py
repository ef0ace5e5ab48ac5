"""A run folder's identity: the config values that define its run (``run_identity.json``).

Rerunning a command resumes its run folder only if the folder was made with the same settings.
What counts comes from the knob declarations (``knobs.knobs_of``): the groups of
``IDENTITY_GROUPS`` less the knobs declared ``identity=False`` (speed or memory only); knobs
declared ``added`` may be missing from an older folder; knobs declared ``resumable`` may change
with ``+resume_with_changes=true``. Folders of the release before ``methods/`` (no
``method._target_`` in their identity) also resume: the method keys that release wrote and this
one no longer reads (``method.neurons``, the knobs a method never used) are not compared.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .checkpoint import load_json, save_json
from .knobs import IDENTITY_GROUPS, knobs_of

IDENTITY_FILE = "run_identity.json"


class RunFolderError(RuntimeError):
    """A run folder holds a run made with other settings; the message says what to do."""


def flat(d: dict, prefix: str = "") -> dict:
    """A nested dict as {"a.b.c": value} (keys starting with ``_`` at the top are left out)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        elif not f"{prefix}{k}".startswith("_"):
            out[f"{prefix}{k}"] = v
    return out


def run_identity(cfg: DictConfig) -> dict:
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in IDENTITY_GROUPS if k in cfg}


def differences(old: dict, new: dict, cfg: DictConfig) -> list[str]:
    """The keys whose values differ between two identities, as the declarations judge them."""
    knobs = {k.key: k for k in knobs_of(cfg)}
    a, b = flat(old), flat(new)
    legacy = "method._target_" not in a  # written before methods/: its method keys are mapped, not compared
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) == b.get(k) or (k in knobs and not knobs[k].identity):
            continue
        if k not in a and (k in knobs and knobs[k].added or (legacy and k == "method._target_")):
            continue
        if legacy and k.startswith("method.") and k not in b:
            continue
        out.append(k)
    return out


def check_run_folder(run_dir: Path, cfg: DictConfig) -> None:
    """Write the run's defining config, or check that an existing run folder was made with it.

    A folder without a completed stage takes the new settings (nothing in it is kept). With
    completed stages, only resumable knobs may differ, and only with ``resume_with_changes``.
    """
    identity = run_identity(cfg)
    path = run_dir / IDENTITY_FILE
    if path.is_file():
        old = load_json(path)
        diff = differences(old, identity, cfg)
        resumable = {k.key for k in knobs_of(cfg) if k.resumable}
        if not diff:
            if set(flat(identity)) != set(flat(old)):  # knobs added (or mapped) since the folder was made: record them from now on
                if "_changes" in old:
                    identity["_changes"] = old["_changes"]
                save_json(path, identity)
            return
        a, b = flat(old), flat(identity)
        if not any((run_dir / "stages").glob("*/manifest.json")):
            print(f"[cns] {run_dir}: no completed stage yet, starting it with the new settings ({', '.join(diff)} changed)")
        elif cfg.get("resume_with_changes", False) and all(k in resumable for k in diff):
            change = {k: [a.get(k), b.get(k)] for k in diff}
            print(f"[cns] resume_with_changes: the remaining stages of {run_dir} use changed settings {change}")
            identity["_changes"] = list(old.get("_changes", [])) + [change]
        else:
            hint = " To keep the completed stages and train the rest with the new values, add +resume_with_changes=true." if all(k in resumable for k in diff) else ""
            raise RunFolderError(
                f"{run_dir} holds a run made with other settings ({', '.join(diff)} differ), so it cannot be resumed.{hint} "
                "Give this run its own folder (e.g. name=my_variant, tag=_v2 or hydra.run.dir=...), or delete that folder to start over."
            )
    save_json(path, identity)
