"""A run's series for tools outside the notebook: TensorBoard event files and an offline wandb run.

The series are what the dashboard draws, taken from the same `train_progress` and `eval` events at the same
steps, under the tags Hugging Face's Trainer uses (`train/loss`, `train/learning_rate`, `eval/loss`, ...), so
a run reads like a Trainer run in either tool. Any loop that emits those events (SFT, preference training)
reports through `RunReports`. Only the process that writes the run's files (rank 0) opens one.
"""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from qwenbook_bridge.engine.train.preference_loss import ORPO_METRICS, REWARD_METRICS
from qwenbook_bridge.engine.errors import InvalidOptionError, MissingPackageError
from qwenbook_bridge.engine.train.tfevents import EventFileWriter

REPORT_TARGETS = ("tensorboard", "wandb")
GIB = float(2**30)
PREFERENCE_METRICS = REWARD_METRICS + ORPO_METRICS

# Progress-event field -> tag; memory in GiB, as TensorBoard's float32 scalars cannot hold byte counts exactly.
TRAIN_TAGS = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
              "epoch": "train/epoch", "tokens_per_s": "train/tokens_per_second"}
MEMORY_TAGS = {"gpu_memory": "train/gpu_memory_gib", "cpu_memory": "train/cpu_memory_gib"}
EVAL_TAGS = {"eval_loss": "eval/loss"}
# Preference runs' metrics, under the tags TRL's trainers write (train/rewards/margins, eval/rewards/margins, ...).
TRAIN_TAGS.update({name: f"train/{name}" for name in PREFERENCE_METRICS})
EVAL_TAGS.update({f"eval_{name}": f"eval/{name}" for name in PREFERENCE_METRICS})


def check_targets(targets: Any) -> list[str]:
    """The problems with a `report` option, as messages (empty when it can work)."""
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        return [f"report must be a list of {' / '.join(REPORT_TARGETS)}, got {targets!r}"]
    problems = [f"report target {t!r} is not one of {', '.join(REPORT_TARGETS)}" for t in targets
                if t not in REPORT_TARGETS]
    if len(set(targets)) != len(targets):
        problems.append(f"report names a target twice: {list(targets)!r}")
    return problems


def require_packages(targets: Sequence[str]) -> None:
    """Fail before any step when a target needs a package that is not installed (TensorBoard needs none)."""
    if "wandb" in targets and importlib.util.find_spec("wandb") is None:
        raise MissingPackageError("report('wandb') needs the wandb package in the worker's Python, which does not "
                                  "have it: run `pip install wandb` (or `pip install 'qwenbook-bridge[wandb]'`) "
                                  "with that Python, or report to 'tensorboard', which needs nothing installed")


def series(kind: str, content: dict[str, Any]) -> dict[str, float]:
    """One `train_progress` or `eval` event's scalars under their tags; other events have none."""
    if kind == "train_progress":
        values = {tag: float(content[key]) for key, tag in TRAIN_TAGS.items() if content.get(key) is not None}
        values.update({tag: content[key] / GIB for key, tag in MEMORY_TAGS.items() if content.get(key) is not None})
        return values
    if kind == "eval":
        return {tag: float(content[key]) for key, tag in EVAL_TAGS.items() if content.get(key) is not None}
    return {}


def logging_dir(output_dir: Path) -> Path:
    """`<output>/runs/<date>_<host>`, the folder Hugging Face's Trainer logs to by default."""
    stamp = datetime.now().strftime("%b%d_%H-%M-%S")
    return output_dir / "runs" / f"{stamp}_{socket.gethostname()}"


class Reporter(Protocol):
    location: str

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardReporter:
    def __init__(self, output_dir: Path) -> None:
        folder = logging_dir(output_dir)
        # Two runs started in the same second (a quick resume) must not share a folder.
        n = 1
        while folder.exists():
            n += 1
            folder = folder.with_name(f"{folder.name.rsplit('.', 1)[0]}.{n}")
        self.writer = EventFileWriter(folder)
        self.location = str(folder)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.writer.add_scalars(step, values)

    def close(self) -> None:
        self.writer.close()


class RunReports:
    """The reporters a run asked for, fed its events; `locations` says where each writes."""

    def __init__(self, targets: Sequence[str], output_dir: Path, *, run_name: str, config: dict[str, Any]) -> None:
        require_packages(targets)
        self.reporters: dict[str, Reporter] = {}
        try:
            for target in targets:
                if target == "tensorboard":
                    self.reporters[target] = TensorBoardReporter(output_dir)
                elif target == "wandb":
                    from qwenbook_bridge.engine.train.wandb_report import WandbReporter

                    self.reporters[target] = WandbReporter(output_dir, run_name, config)
                else:
                    raise InvalidOptionError(f"unknown report target {target!r}")
        except BaseException:
            self.close()
            raise

    @property
    def locations(self) -> dict[str, str]:
        return {target: r.location for target, r in self.reporters.items()}

    def __call__(self, kind: str, content: dict[str, Any]) -> None:
        values = series(kind, content)
        if values:
            for reporter in self.reporters.values():
                reporter.log(int(content["step"]), values)

    def close(self) -> None:
        for reporter in self.reporters.values():
            reporter.close()
        self.reporters.clear()
