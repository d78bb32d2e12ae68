"""Training checkpoints: `checkpoint-<step>/` folders written atomically, found again for resuming.

A checkpoint folder holds the trained weights in their ordinary format (a peft adapter folder, or a
transformers model folder for full fine-tuning), so it can be loaded as it is, plus:
  training_state.pt   optimizer, scheduler, grad-scaler and RNG states (torch.save, loadable weights_only)
  trainer_state.json  the run so far in the shape Hugging Face's Trainer writes (hf_state.py), for other tools
  run_state.json      what resuming needs: step, data position, eval results, the event history so far
  train_config.json   the options of the run that wrote it
(Checkpoints of earlier versions kept the resume fields in trainer_state.json; they still resume.)
It is written into a hidden sibling folder (atomic_write.AtomicTarget: `.checkpoint-<step>.partial-<pid>-XXXX`)
that is fsync'd and renamed into place only when complete, so a folder named checkpoint-<step> is never half
written; a full disk removes the partial folder and raises InsufficientDiskSpaceError, leaving the earlier
checkpoints as they were.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qwenbook_bridge.engine.files.atomic_write import AtomicTarget, is_temporary, remove_leftovers, tree_bytes
from qwenbook_bridge.engine.errors import EngineError

TRAINER_STATE = "trainer_state.json"
RUN_STATE = "run_state.json"
TRAINING_STATE = "training_state.pt"
TRAIN_CONFIG = "train_config.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")
# What earlier versions named the folder being written; still cleared when a run starts.
_LEGACY_TMP_PREFIX = ".tmp-checkpoint-"


class CheckpointError(EngineError):
    """A checkpoint folder is missing, incomplete, or does not fit the run being resumed."""


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _state_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_state_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_state_bytes(v) for v in value)
    return 0


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(value, indent=2, ensure_ascii=False))


def write_checkpoint(output_dir: Path, step: int, write_weights: Callable[[Path], None],
                     training_state: dict[str, Any], run_state: dict[str, Any], config: dict[str, Any],
                     trainer_state: dict[str, Any] | None = None) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    # For the disk-full message: the newest checkpoint is the best guess at this one's size (optimizer state
    # alone is the guess for the first).
    previous = list_checkpoints(output_dir)
    needed = tree_bytes(previous[-1]) if previous else _state_bytes(training_state)
    # A same-step checkpoint from an earlier attempt is replaced; until the new one is complete it stays.
    with AtomicTarget(final, overwrite=True, is_dir=True, needed=needed) as tmp:
        write_weights(tmp)
        # Through a file object rather than a path: torch then writes with Python file calls, into a file this
        # code opened (and AtomicTarget fsyncs before the rename).
        with open(tmp / TRAINING_STATE, "wb") as f:
            torch.save(training_state, f)
        _write_json(tmp / TRAIN_CONFIG, config)
        _write_json(tmp / RUN_STATE, {"format_version": FORMAT_VERSION, **run_state})
        # Without a Trainer-shaped state (callers that only checkpoint), the resume state stands in for it, so
        # the folder still counts as complete.
        _write_json(tmp / TRAINER_STATE, trainer_state if trainer_state is not None
                    else {"format_version": FORMAT_VERSION, **run_state})
    return final


def remove_stale_temporaries(output_dir: Path) -> None:
    """Delete leftovers of checkpoints whose writer was killed (their process is gone)."""
    if not output_dir.is_dir():
        return
    for p in list(output_dir.iterdir()):
        if p.is_dir() and p.name.startswith(_LEGACY_TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
        elif is_temporary(p.name) and p.name.startswith(".checkpoint-"):
            remove_leftovers(output_dir / p.name[1:].split(".", 1)[0])


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest step first."""
    if not output_dir.is_dir():
        return []
    # Both state files: a folder copied or restored only in part is not a checkpoint to resume from.
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if p.is_dir() and (m := _NAME.match(p.name)) and (p / TRAINER_STATE).is_file()
             and (p / TRAINING_STATE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint folder as given, or the newest complete checkpoint inside a run folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint not found")
    if (p / TRAINER_STATE).is_file() and (p / TRAINING_STATE).is_file():
        return p
    found = list_checkpoints(p)
    if found:
        return found[-1]
    raise CheckpointError(f"{p}: not a checkpoint (no {TRAINER_STATE} / {TRAINING_STATE}) and holds no complete "
                          "checkpoint-<step> folder")


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """What resuming needs (run_state.json; trainer_state.json in checkpoints of earlier versions)."""
    name = RUN_STATE if (checkpoint / RUN_STATE).is_file() else TRAINER_STATE
    try:
        state = json.loads((checkpoint / name).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{checkpoint}: cannot read {name}: {e}") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{checkpoint}: checkpoint format {state.get('format_version')!r} is not supported "
                              f"(expected {FORMAT_VERSION})")
    return state


def read_training_state(checkpoint: Path, device: torch.device) -> dict[str, Any]:
    try:
        return torch.load(checkpoint / TRAINING_STATE, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the file cannot be used
        raise CheckpointError(f"{checkpoint}: cannot read {TRAINING_STATE}: {e}") from None


def publish(checkpoint: Path, output_dir: Path, names: list[str]) -> None:
    """Make the checkpoint's weight files the run's final output: hard links (no extra disk), else copies."""
    for name in names:
        src = checkpoint / name
        with AtomicTarget(output_dir / name, overwrite=True, is_dir=False, needed=src.stat().st_size) as tmp:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copy2(src, tmp)
