"""Entry point: ``python -m cns_lightning +experiment=seq7`` (Hydra; ``-m`` for sweeps)."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

# ${micro_asset:clip} -> the absolute path of a shipped micro-world model folder.
OMEGACONF_RESOLVERS = {
    "micro_asset": lambda name: str(Path(__file__).resolve().parent / "assets" / "micro" / name),
}
for _name, _fn in OMEGACONF_RESOLVERS.items():
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


# The configs ship inside the package (src/cns_lightning/conf/), so a wheel install finds them;
# ``--config-dir DIR`` adds a user's own folder to the search path (its groups and experiments
# beside the shipped ones; same-named files in DIR win).
CONFIG_DIR = Path(__file__).resolve().parent / "conf"


# Known-harmless notices from Lightning that would drown the run's own output.
for pattern in (".*LeafSpec.*", ".*in eval mode at the start of training.*", ".*smaller than the logging interval.*", ".*does not have many workers.*", ".*torchvision.*"):
    warnings.filterwarnings("ignore", message=pattern)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def input_error(exc: BaseException) -> BaseException | None:
    """The project's own bad-input error behind ``exc`` (itself, or what it was raised from, as in
    Hydra's ``InstantiationException``), else None: a bug, whose traceback is worth seeing."""
    from .checkpoint import CheckpointError
    from .concepts import ConceptError
    from .continual import RunError
    from .evaluation.state import StateError
    from .images import ImageInputError
    from .methods import MethodConfigError
    from .methods.base import StageFormatError
    from .models import ModelInputError
    from .preflight import ConfigValueError
    from .restore import RestoreError
    from .run_folder import RunFolderError

    known = (RunError, RunFolderError, ConfigValueError, ConceptError, ImageInputError, CheckpointError, StateError,
             MethodConfigError, StageFormatError, RestoreError, ModelInputError)
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, known):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


def remove_if_empty(folder: Path, root: Path | None = None) -> None:
    """Hydra makes the run folder (and its parents) before the task starts: a refused command
    leaves no empty one, nor empty parents below ``root`` (the output root, which stays)."""
    folder = folder.resolve()
    floor = root.resolve() if root is not None else folder.parent
    if floor not in folder.parents:  # a run folder outside the output root: only itself
        floor = folder.parent
    while folder != floor:
        try:
            folder.rmdir()  # only succeeds when empty
        except OSError:
            return
        folder = folder.parent


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from .continual import run
    from .distributed import teardown_distributed

    try:
        run(cfg)
    except Exception as e:  # bad input: its message (what, where, the fix), no traceback, exit status 1
        err = input_error(e)
        if err is None:
            raise
        remove_if_empty(Path(cfg.paths.run_dir), Path(cfg.paths.output_root))
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        teardown_distributed()


if __name__ == "__main__":
    main()
