"""An offline wandb run inside the run folder: `<output>/wandb/offline-run-<time>-<id>/`.

Offline mode never opens a connection; `wandb sync <that folder>` uploads it later, if the user wants to.
wandb is imported here only, so runs that do not report to it never need it (reporting.require_packages
checks it is there before a run starts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qwenbook_bridge.engine.errors import MissingPackageError


class WandbReporter:
    def __init__(self, output_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as e:  # installed, but a dependency of its own is missing or broken
            raise MissingPackageError(f"report('wandb'): the wandb package is installed but cannot be imported "
                                      f"({e}); reinstall it with `pip install wandb` in the worker's Python") from e

        output_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(mode="offline", console="off", disable_git=True, x_disable_stats=True,
                                  x_save_requirements=False, silent=True)
        self.run = wandb.init(mode="offline", dir=str(output_dir), project=output_dir.name, name=run_name,
                              config=config, settings=settings, reinit="create_new")
        # run.dir is the run's files/ folder; its parent holds the .wandb file that `wandb sync` reads.
        self.location = str(Path(self.run.dir).parent)

    def log(self, step: int, values: dict[str, float]) -> None:
        # A train and an eval event of the same step land in one history row, as in a Trainer run.
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
