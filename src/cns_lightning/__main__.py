"""Entry point: ``python -m cns_lightning +experiment=seq7`` (Hydra; ``-m`` for sweeps)."""

from __future__ import annotations

import os
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


def config_dir() -> str:
    """The config folder: $CNS_CONFIG_DIR, else the repository's conf/ (editable install)."""
    if os.environ.get("CNS_CONFIG_DIR"):
        return os.environ["CNS_CONFIG_DIR"]
    return str(Path(__file__).resolve().parents[2] / "conf")


# Known-harmless notices from Lightning that would drown the run's own output.
for pattern in (".*LeafSpec.*", ".*in eval mode at the start of training.*", ".*smaller than the logging interval.*", ".*does not have many workers.*", ".*torchvision.*"):
    warnings.filterwarnings("ignore", message=pattern)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from .continual import run
    from .distributed import teardown_distributed

    run(cfg)
    teardown_distributed()


if __name__ == "__main__":
    main()
