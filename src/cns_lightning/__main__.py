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


# The configs ship inside the package (src/cns_lightning/conf/), so a wheel install finds them;
# ``--config-dir DIR`` adds a user's own folder to the search path (its groups and experiments
# beside the shipped ones; same-named files in DIR win).
CONFIG_DIR = Path(__file__).resolve().parent / "conf"


# Known-harmless notices from Lightning that would drown the run's own output.
for pattern in (".*LeafSpec.*", ".*in eval mode at the start of training.*", ".*smaller than the logging interval.*", ".*does not have many workers.*", ".*torchvision.*"):
    warnings.filterwarnings("ignore", message=pattern)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from .continual import run
    from .distributed import teardown_distributed

    run(cfg)
    teardown_distributed()


if __name__ == "__main__":
    main()
