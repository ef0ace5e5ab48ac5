"""A run folder's identity: the config values that define its run (``run_identity.json``).

Rerunning a command resumes its run folder only if the folder was made with the same settings.
What counts comes from the knob declarations (``knobs.knobs_of``): the groups of
``IDENTITY_GROUPS`` less the knobs declared ``identity=False`` (speed or memory only); knobs
declared ``added`` may be missing from an older folder (if declared with ``before``, only while
the run keeps that value); knobs declared ``resumable`` may change
with ``+resume_with_changes=true``. A ``data.concepts`` that starts with the folder's concepts
(same order, same entries) and adds more extends the run (:func:`concept_extension`); any other
change of the concepts is refused, naming the first difference. Folders of the release before ``methods/`` (no
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
        if k not in a and (k in knobs and knobs[k].added and knobs[k].before in (None, b.get(k)) or (legacy and k == "method._target_")):
            continue
        if legacy and k.startswith("method.") and k not in b:
            continue
        out.append(k)
    return out


NEW_RUN = "Give this run its own folder (e.g. name=my_variant, tag=_v2 or hydra.run.dir=...), or delete that folder to start over."


def _entry(e) -> str:
    return ", ".join(f"{k}: {v}" for k, v in e.items()) if isinstance(e, dict) else repr(e)


def concept_extension(old: list, new: list, run_dir: Path) -> int:
    """How many concepts ``new`` adds to the run folder's ``old`` sequence (0: the same sequence).

    Raises :class:`RunFolderError` unless ``new`` starts with ``old``, entry for entry: the message
    names the first concept that was removed, moved or changed, and how to start a new run instead.
    """
    old, new = list(old or []), list(new or [])
    for i, (a, b) in enumerate(zip(old, new)):
        if a == b:
            continue
        name_a = a.get("name") if isinstance(a, dict) else a
        where = next((j for j, e in enumerate(new) if isinstance(e, dict) and e.get("name") == name_a), None)
        if isinstance(b, dict) and isinstance(a, dict) and b.get("name") == name_a:
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            what = f"data.concepts[{i}] ({name_a}) changed: " + "; ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys)
        elif where is not None:
            what = f"data.concepts[{i}] was {name_a!r} and is now {b.get('name') if isinstance(b, dict) else b!r} ({name_a!r} moved to position {where})"
        else:
            what = f"data.concepts[{i}] was {{{_entry(a)}}} and is now {{{_entry(b)}}}"
        break
    else:
        if len(new) >= len(old):
            return len(new) - len(old)
        gone = ", ".join(str(e.get("name") if isinstance(e, dict) else e) for e in old[len(new):])
        what = f"the folder's sequence has {len(old)} concepts, this command {len(new)} ({gone} removed)"
    raise RunFolderError(
        f"{run_dir} holds a run whose concepts cannot change this way: {what}. A run can only be extended: "
        f"keep its {len(old)} concepts first, in the same order and with the same entries, and add new ones after them. "
        f"To learn another sequence, give it its own run folder (name=..., tag=... or hydra.run.dir=...) or delete this one "
        f"to start over; to build on the trained model, export it (python -m cns_lightning.export {run_dir} DIR) and start "
        "the new sequence on it with model.path=DIR (with model=sd15, or model=micro for the micro world)."
    )


def check_run_folder(run_dir: Path, cfg: DictConfig) -> int:
    """Write the run's defining config, or check that an existing run folder was made with it.

    A folder without a completed stage takes the new settings (nothing in it is kept). With
    completed stages, only resumable knobs may differ, and only with ``resume_with_changes``;
    ``data.concepts`` may add concepts after the folder's (:func:`concept_extension`). Returns the
    number of concepts added to a folder with completed stages.
    """
    identity = run_identity(cfg)
    path = run_dir / IDENTITY_FILE
    added = 0
    if path.is_file():
        old = load_json(path)
        diff = differences(old, identity, cfg)
        resumable = {k.key for k in knobs_of(cfg) if k.resumable}
        a, b = flat(old), flat(identity)
        done = any((run_dir / "stages").glob("*/manifest.json"))
        if "data.concepts" in diff and done:
            added = concept_extension(a.get("data.concepts"), b.get("data.concepts"), run_dir)
            diff = [k for k in diff if k != "data.concepts"]
            if not diff:
                print(f"[cns] extending {run_dir}: its {len(a.get('data.concepts') or [])} concepts are kept, {added} new ones are trained")
                for key in ("_changes",):
                    if key in old:
                        identity[key] = old[key]
                save_json(path, identity)
                return added
        if not diff:
            if set(flat(identity)) != set(flat(old)):  # knobs added (or mapped) since the folder was made: record them from now on
                if "_changes" in old:
                    identity["_changes"] = old["_changes"]
                save_json(path, identity)
            return added
        if not done:
            print(f"[cns] {run_dir}: no completed stage yet, starting it with the new settings ({', '.join(diff)} changed)")
        elif cfg.get("resume_with_changes", False) and all(k in resumable for k in diff):
            change = {k: [a.get(k), b.get(k)] for k in diff}
            print(f"[cns] resume_with_changes: the remaining stages of {run_dir} use changed settings {change}")
            identity["_changes"] = list(old.get("_changes", [])) + [change]
            if added:
                print(f"[cns] extending {run_dir}: {added} new concepts are trained")
        else:
            hint = " To keep the completed stages and train the rest with the new values, add +resume_with_changes=true." if all(k in resumable for k in diff) else ""
            raise RunFolderError(
                f"{run_dir} holds a run made with other settings ({', '.join(diff)} differ), so it cannot be resumed.{hint} {NEW_RUN}"
            )
    save_json(path, identity)
    return added
