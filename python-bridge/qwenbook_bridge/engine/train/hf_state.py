"""`trainer_state.json` in the shape Hugging Face's Trainer writes (transformers' `TrainerState`).

Tools that read Trainer checkpoints (TensorBoard-less plotting such as LLaMA-Factory's `plot_loss`, which
reads `log_history` entries with `loss` and `step`; `TrainerState.load_from_json`; dashboards) read ours
the same way. What resuming needs lives beside it in run_state.json (checkpoints.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


# The keys of preference metrics in history entries (preference_loss.py names them as TRL does).
METRIC_PREFIXES = ("rewards/", "logps/", "nll_loss", "log_odds_")


@dataclass
class RunShape:
    """What the file says about the run as a whole, in the Trainer's terms."""

    max_steps: int
    steps_per_epoch: float
    logging_steps: int
    eval_steps: int
    save_steps: int
    train_batch_size: int
    total_params: int
    is_world_process_zero: bool = True
    is_local_process_zero: bool = True


def log_entry(entry: dict[str, Any], shape: RunShape) -> dict[str, Any] | None:
    """One of our history entries as a Trainer `log_history` entry (None for kinds the Trainer does not log)."""
    step = int(entry["step"])
    epoch = round(step / shape.steps_per_epoch, 4)
    if entry.get("kind") == "train_progress":
        out = {"epoch": float(entry.get("epoch", epoch)), "grad_norm": float(entry["grad_norm"]),
               "learning_rate": float(entry["lr"]), "loss": float(entry["loss"])}
        # A preference run's metrics, under the names TRL's trainers log them ("rewards/margins", ...).
        out.update({k: float(v) for k, v in entry.items() if k.startswith(METRIC_PREFIXES)})
        return {**out, "step": step}
    if entry.get("kind") == "eval":
        out: dict[str, Any] = {"epoch": float(epoch), "eval_loss": float(entry["eval_loss"])}
        runtime = entry.get("eval_runtime_s")
        if runtime:
            rows = int(entry.get("eval_examples", 0))
            batches = math.ceil(rows / shape.train_batch_size) if rows else 0
            out.update(eval_runtime=round(float(runtime), 4),
                       eval_samples_per_second=round(rows / runtime, 3),
                       eval_steps_per_second=round(batches / runtime, 3))
        out.update({k: float(v) for k, v in entry.items() if k.startswith(tuple(f"eval_{p}" for p in METRIC_PREFIXES))})
        out["step"] = step
        return out
    return None


def trainer_state(history: list[dict[str, Any]], shape: RunShape, *, step: int, tokens_seen: int,
                  best: tuple[float, int] | None, best_checkpoint: str | None) -> dict[str, Any]:
    """The whole file at `step`. `best` is (best eval loss, its step); `best_checkpoint` the folder saved at that
    step, when one was. total_flos is the Trainer's own estimate, 6 x parameters x tokens."""
    entries = [e for e in (log_entry(h, shape) for h in history) if e is not None]
    return {
        "best_global_step": best[1] if best else None,
        "best_metric": best[0] if best else None,
        "best_model_checkpoint": best_checkpoint,
        "epoch": round(step / shape.steps_per_epoch, 4),
        "eval_steps": shape.eval_steps,
        "global_step": step,
        "is_hyper_param_search": False,
        "is_local_process_zero": shape.is_local_process_zero,
        "is_world_process_zero": shape.is_world_process_zero,
        "log_history": entries,
        "logging_steps": shape.logging_steps,
        "max_steps": shape.max_steps,
        "num_input_tokens_seen": tokens_seen,
        "num_train_epochs": math.ceil(shape.max_steps / shape.steps_per_epoch),
        "save_steps": shape.save_steps,
        "stateful_callbacks": {"TrainerControl": {"args": {
            "should_epoch_stop": False, "should_evaluate": False, "should_log": False, "should_save": True,
            "should_training_stop": step >= shape.max_steps}, "attributes": {}}},
        "total_flos": float(6 * shape.total_params * tokens_seen),
        "train_batch_size": shape.train_batch_size,
        "trial_name": None,
        "trial_params": None,
    }
