"""Supervised fine-tuning (LoRA or full) of a loaded causal LM, in process.

    result = train(model, tokenizer, [DatasetSpec("data.json")], TrainConfig(output_dir="runs/a"),
                   on_event=lambda kind, content: print(kind, content), cancel=threading.Event())

The loop reads top to bottom in `_Run.run`: each optimizer step takes its micro-batches from a seeded
schedule, accumulates the gradient of the mean token loss over the whole step, clips, steps AdamW and the
learning-rate schedule, then logs, evaluates and checkpoints when due. Events go to `on_event(kind, content)`
with kind one of EVENT_KINDS; content is plain JSON data. The caller's model comes back unchanged whatever
happens (see trainable.py); the trained adapter or weights are on disk under `config.output_dir`.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil
import torch

from qwenbook_bridge.engine.train import checkpoints as ckpt
from qwenbook_bridge.engine.train.hf_state import RunShape, trainer_state
from qwenbook_bridge.engine.train.reporting import RunReports, require_packages
from qwenbook_bridge.engine.files.atomic_write import write_text_atomic
from qwenbook_bridge.engine.train.batches import Batch, DataSchedule, collate, collate_pairs, make_units, split_eval
from qwenbook_bridge.engine.data.datasets import DatasetSpec
from qwenbook_bridge.engine.train.data_parallel import DataParallel
from qwenbook_bridge.engine.data.chat_encoding import TokenizedDataset, build_dataset
from qwenbook_bridge.engine.data.preference_data import PreferenceDataset, build_preference_dataset
from qwenbook_bridge.engine.train.preference import (REFERENCE_FILE, PreferenceObjective, load_reference,
                                                     precompute_reference, save_reference)
from qwenbook_bridge.engine.errors import EngineError, InvalidOptionError, is_out_of_memory
from qwenbook_bridge.engine.train.fsdp import restore_optimizer
from qwenbook_bridge.engine.train.graphed_step import GraphedStep, graphable
from qwenbook_bridge.engine.train.step import StepRunner, build_optimizer
from qwenbook_bridge.engine.model_parts import has_injected_adapters
from qwenbook_bridge.engine.train.trainable import (Trainable, init_adapter_settings, precision_plan,
                                                   resolve_parameter_targets, resolve_targets)
from qwenbook_bridge.engine.train.config import TrainConfig

EventSink = Callable[[str, dict[str, Any]], None]
EVENT_KINDS = ("train_begin", "train_progress", "eval", "checkpoint")


class TrainingError(EngineError):
    """Training stopped on a problem it cannot continue past (non-finite loss, ...)."""


class TrainingOutOfMemoryError(TrainingError):
    """The device ran out of memory during training; the message says what to change."""


@dataclass
class TrainResult:
    status: Literal["completed", "cancelled"]
    method: str
    output_dir: str
    # LoRA: a peft adapter folder (PeftModel.from_pretrained loads it). Full: a transformers model folder.
    adapter_path: str | None
    model_path: str | None
    step: int
    total_steps: int
    epoch: float
    final_loss: float | None
    best_eval_loss: float | None
    final_eval_loss: float | None
    tokens: int
    tokens_per_s: float
    elapsed_s: float
    checkpoints: list[str]
    dataset: dict[str, Any]
    history: list[dict[str, Any]]
    resumed_from: str | None = None
    notes: list[str] = field(default_factory=list)
    # Where each `report` target wrote: {"tensorboard": "<output>/runs/<date>_<host>", "wandb": "<run folder>"}.
    reports: dict[str, str] = field(default_factory=dict)
    # A preference run's method and its last reported metrics (TRL's names: rewards/margins, ...).
    preference: str | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train(model: Any, tokenizer: Any, datasets: Sequence[DatasetSpec], config: TrainConfig, *,
          on_event: EventSink | None = None, cancel: threading.Event | None = None,
          parallel: DataParallel | None = None) -> TrainResult:
    """Fine-tune `model` on `datasets`. Bad options raise InvalidOptionError before the model is touched; a
    cancelled run writes a checkpoint and returns status "cancelled"; out of memory raises
    TrainingOutOfMemoryError after freeing what the run allocated.

    With `parallel` (one rank of several, see data_parallel.py) `config.grad_accum` is the GLOBAL count of
    micro-batches per step; only rank 0 writes checkpoints and results."""
    config.validate()
    if parallel is None or parallel.is_main:  # only the writing rank reports
        require_packages(config.report)
    run = _Run(model, tokenizer, datasets, config, on_event or (lambda kind, content: None), cancel, parallel)
    failure: Exception | None = None
    try:
        return run.run()
    except Exception as e:
        if not _is_out_of_memory(e):
            raise
        # Built here but raised after the handler exits, so the traceback holding the step's activations is
        # dropped before memory is released.
        failure = TrainingOutOfMemoryError(run.oom_message(e))
    finally:
        run.release()
    raise failure


def _is_out_of_memory(e: BaseException) -> bool:
    return is_out_of_memory(e)


@dataclass
class _Meter:
    """Throughput and loss since the last progress event, and totals for this session of the run."""

    start_step: int
    started: float = field(default_factory=time.perf_counter)
    train_time: float = 0.0
    tokens: int = 0
    window_loss: float = 0.0
    window_steps: int = 0
    window_tokens: int = 0
    window_time: float = 0.0
    window_metrics: dict[str, float] = field(default_factory=dict)

    def add(self, loss: float, tokens: int, seconds: float, metrics: dict[str, float] | None = None) -> None:
        for name, value in (metrics or {}).items():
            self.window_metrics[name] = self.window_metrics.get(name, 0.0) + value
        self.train_time += seconds
        self.tokens += tokens
        self.window_loss += loss
        self.window_steps += 1
        self.window_tokens += tokens
        self.window_time += seconds

    def report(self, run: _Run, lr: float, grad_norm: float) -> dict[str, Any]:
        steps_done = run.step - self.start_step
        event = {"step": run.step, "total_steps": run.total_steps,
                 "epoch": round(run.step / run.schedule.steps_per_epoch, 4),
                 "loss": self.window_loss / self.window_steps, "lr": lr, "grad_norm": grad_norm,
                 "tokens_per_s": self.window_tokens / self.window_time if self.window_time > 0 else 0.0,
                 "eta_s": self.train_time / steps_done * (run.total_steps - run.step),
                 "cpu_memory": psutil.Process().memory_info().rss}
        if run.device.type == "cuda":  # what the allocator holds, as the memory gauge counts the process
            event["gpu_memory"] = torch.cuda.memory_reserved(run.device)
        event.update({name: total / self.window_steps for name, total in self.window_metrics.items()})
        self.window_loss, self.window_steps, self.window_tokens, self.window_time = 0.0, 0, 0, 0.0
        self.window_metrics = {}
        return event


class _Run:
    def __init__(self, model: Any, tokenizer: Any, datasets: Sequence[DatasetSpec], config: TrainConfig,
                 emit: EventSink, cancel: threading.Event | None, parallel: DataParallel | None = None) -> None:
        self.model, self.tokenizer, self.datasets, self.cfg = model, tokenizer, datasets, config
        self.emit, self.cancel, self.parallel = emit, cancel, parallel
        self.writes = parallel is None or parallel.is_main
        self.device = next(model.parameters()).device
        self.out = Path(config.output_dir)
        self.trainable: Trainable | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.scaler: torch.amp.GradScaler | None = None
        self.runner: StepRunner | None = None
        self.graphed: GraphedStep | None = None
        self.reports: RunReports | None = None
        self.step = 0
        self.tokens_before = 0  # tokens trained on before this session (a resumed run's earlier ones)

    # -- setup: everything that can fail on bad input happens before the model is touched -----------------
    def _setup(self) -> None:
        cfg = self.cfg
        if has_injected_adapters(self.model):
            raise InvalidOptionError("the model has adapters loaded; unload them (or train inside "
                                     "AdapterManager.suspended()) before training a new one")
        if cfg.preference is not None and self.parallel is not None:
            raise InvalidOptionError("preference tuning runs on one device for now; leave devices/strategy/cluster "
                                     "out")
        if cfg.init_adapter:
            cfg.lora = init_adapter_settings(cfg.init_adapter)
        self.autocast, use_scaler, self.notes = precision_plan(cfg, self.model, self.device)
        if cfg.preference is not None and cfg.method == "lora" and cfg.lora.dropout:
            # As TRL's preference trainers do (disable_dropout): with dropout the policy at step 1 would differ
            # from the reference it is measured against, and the two answers of a pair would see different noise.
            self.notes.append(f"LoRA dropout {cfg.lora.dropout} is off for preference tuning (as in TRL), so the "
                              "policy starts equal to its reference")
            cfg.lora.dropout = 0.0
        self.resume = ckpt.resolve_checkpoint(cfg.resume_from) if cfg.resume_from else None
        previous_run = self._previous_run()
        self.data: TokenizedDataset | PreferenceDataset
        if cfg.preference is not None:
            self.data = build_preference_dataset(self.datasets, self.tokenizer, cfg.max_length,
                                                 truncation=cfg.truncation)
        else:
            self.data = build_dataset(self.datasets, self.tokenizer, cfg.max_length, truncation=cfg.truncation,
                                      seed=cfg.seed)
        self.notes += self.data.stats.notes
        self.train_set, self.eval_set = split_eval(self.data.examples, cfg.eval_split, cfg.seed)
        if not self.train_set:
            raise InvalidOptionError(f"eval_split {cfg.eval_split} leaves no rows to train on "
                                     f"({len(self.data.examples)} examples); lower it or add data")
        self.units = make_units(self.train_set, cfg.max_length, cfg.packing, cfg.seed)
        self.schedule = DataSchedule(len(self.units), cfg.batch_size, cfg.grad_accum, cfg.seed)
        self.total_steps = cfg.max_steps or math.ceil(cfg.epochs * self.schedule.steps_per_epoch)
        self.warmup = min(cfg.warmup_steps(self.total_steps), self.total_steps)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        resume_state = ckpt.read_trainer_state(self.resume) if self.resume else None
        if resume_state and resume_state["step"] >= self.total_steps:
            raise InvalidOptionError(f"{self.resume} is already at step {resume_state['step']} of "
                                     f"{self.total_steps}; raise epochs or max_steps to train further")
        trainable = Trainable(self.model, cfg, self.tokenizer, keep_original=self.parallel is None)
        if self.resume:
            trainable.check_resumable(self.resume)
        elif cfg.method == "lora" and not cfg.init_adapter:
            resolve_targets(self.model, cfg.lora.targets)
            resolve_parameter_targets(self.model, cfg.lora.targets, cfg.lora.dropout)
        if self.writes:
            ckpt.remove_stale_temporaries(self.out)
            if previous_run:
                self._clear_previous_run(previous_run)

        # From here on the model is changed; release() puts it back.
        torch.manual_seed(cfg.seed)  # the same LoRA initialization for the same seed
        self.trainable = trainable
        trainable.prepare()
        self.notes += trainable.notes
        self.objective = self._objective(trainable)
        if self.resume:  # into the whole model, before a sharded run splits it over the ranks
            trainable.load(self.resume)
        loss_module = self.parallel.wrap(self.model) if self.parallel is not None else None
        self.optimizer = build_optimizer(self.trainable.parameters(), cfg, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.scaler = torch.amp.GradScaler(self.device.type) if use_scaler else None
        self.runner = StepRunner(trainable, self.optimizer, device=self.device, max_grad_norm=cfg.max_grad_norm,
                                 autocast=self.autocast, scheduler=self.scheduler, scaler=self.scaler,
                                 parallel=self.parallel, loss_module=loss_module, objective=self.objective)
        # compile asks for the fastest steps: where a step can be captured, steps of one shape replay as a graph.
        dropout = cfg.lora.dropout if cfg.method == "lora" else 0.0
        # Not a preference step: its pair batches and reference log-probabilities are not what a graph captures.
        self.graphed = (GraphedStep(self.runner) if cfg.compile and cfg.preference is None and graphable(
            self.runner, grad_accum=cfg.grad_accum, dropout=dropout, step_tokens=cfg.micro_batch_tokens,
            hidden=self.model.config.get_text_config().hidden_size) is None else None)
        if self.parallel is not None:
            self.parallel.broadcast_parameters(self.trainable.parameters())
        self.best_eval: float | None = None
        self.best_eval_step: int | None = None
        self.last_eval: float | None = None
        self.history: list[dict[str, Any]] = []
        self.saved: dict[int, Path] = {}
        if self.resume:
            self._restore(self.resume, resume_state or {})

    def _objective(self, trainable: Trainable) -> PreferenceObjective | None:
        """The preference objective (None: supervised). Runs after the model is prepared and before a resumed
        run's weights are loaded, so a precomputed DPO reference is the model as the run first started."""
        p = self.cfg.preference
        if p is None:
            return None
        in_step = p.method == "dpo" and self.cfg.method == "lora" and not self.cfg.init_adapter
        if p.method == "dpo" and not in_step:
            self._reference()
        return PreferenceObjective(p.method, p.resolved_beta, label_smoothing=p.label_smoothing, gamma=p.gamma,
                                   peft_model=trainable.peft_model if in_step else None)

    def _reference(self) -> None:
        """Every pair's reference log-probabilities: the run folder's stored ones for this data, else computed
        now (and stored, so that a resumed run uses exactly these)."""
        data = self.data
        assert isinstance(data, PreferenceDataset)
        values = load_reference(self.out, data.fingerprint(), len(data.examples)) if self.resume else None
        if values is None:
            values = precompute_reference(self.model, data.examples, pad_id=self._pad_id(),
                                          batch_size=self.cfg.batch_size, device=self.device, autocast=self.autocast)
            if self.writes:
                self.out.mkdir(parents=True, exist_ok=True)
                save_reference(self.out, data.fingerprint(), values)
        for ex, v in zip(data.examples, values):
            ex.ref_logps = v

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def _collate(self, examples: Sequence[Any], units: Sequence[Sequence[int]], ids: Sequence[int]) -> Batch:
        if self.cfg.preference is not None:  # units are single pairs (no packing)
            return collate_pairs(examples, [units[u][0] for u in ids], self.pad_id)
        return collate(examples, units, ids, self.pad_id, self.cfg.packing)

    def _previous_run(self) -> list[Path]:
        """Checkpoints of an earlier run in output_dir that this (fresh) run would mix with."""
        existing = ckpt.list_checkpoints(self.out)
        if not existing or self.resume:
            return []
        if not self.cfg.overwrite:
            raise InvalidOptionError(f"{self.out} already holds checkpoints of another run ({existing[-1].name}); "
                                     "resume it (resume_from), pass overwrite=True to replace it, or choose "
                                     "another output_dir")
        return existing

    def _clear_previous_run(self, existing: list[Path]) -> None:
        for p in existing:
            shutil.rmtree(p)
        for pattern in ("*.safetensors", "*.safetensors.index.json", "adapter_config.json", "train_result.json",
                        ckpt.TRAINER_STATE, REFERENCE_FILE):
            for f in self.out.glob(pattern):
                f.unlink()

    def _lr_factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.cfg.schedule == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total_steps - self.warmup)
        if self.cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def _restore(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """Everything but the weights (loaded in _setup) from `checkpoint`."""
        assert self.trainable is not None and self.optimizer is not None
        training = ckpt.read_training_state(checkpoint, self.device)
        restore_optimizer(self.model, self.optimizer, training, self.parallel, checkpoint)
        self.scheduler.load_state_dict(training["scheduler"])
        if self.scaler is not None and training.get("scaler"):
            self.scaler.load_state_dict(training["scaler"])
        ckpt.set_rng_state(training["rng"])
        self.step = int(state["step"])
        self.best_eval, self.last_eval = state.get("best_eval_loss"), state.get("last_eval_loss")
        self.best_eval_step = state.get("best_eval_step")
        self.history = list(state.get("log_history", []))
        self.tokens_before = int(state.get("tokens_seen", 0))
        if state.get("data_fingerprint") != self.data.fingerprint():
            self.notes.append(f"the data differs from what {checkpoint.name} was trained on; training continues "
                              "on the new data")

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self._setup()
        self._begin()
        status: Literal["completed", "cancelled"] = "completed"
        while self.step < self.total_steps:
            cancelled = self.cancel is not None and self.cancel.is_set()
            if self.parallel is not None:  # every rank stops at the same step, or one waits for the others forever
                cancelled = self.parallel.any_(cancelled)
            if cancelled:
                status = "cancelled"
                break
            lr = float(self.scheduler.get_last_lr()[0])  # a tensor once the step replays as a CUDA graph
            t0 = time.perf_counter()
            try:
                loss, grad_norm, tokens = self._train_step()
            except Exception as e:
                if self.parallel is not None and self.parallel.is_peer_failure(e):
                    self._save_after_lost_rank()
                raise
            self.meter.add(loss, tokens, time.perf_counter() - t0, self.step_metrics)
            self.step += 1

            if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                report = self.meter.report(self, lr, grad_norm)
                if self.parallel is not None:  # a collective: every rank logs at the same steps
                    report["rank_memory"] = self.parallel.memory()
                self._event("train_progress", report)
            if self.eval_set and self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                self._evaluate()
            if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.total_steps:
                self._checkpoint("periodic")
        return self._finish(status)

    def _begin(self) -> None:
        assert self.trainable is not None
        cfg = self.cfg
        trainable_params, total_params = self.trainable.count()
        self.meter = _Meter(start_step=self.step)
        if self.writes and cfg.report:
            self.reports = RunReports(cfg.report, self.out, run_name=self.out.name, config=cfg.to_dict())
        self.emit("train_begin", {
            "total_steps": self.total_steps, "steps_per_epoch": self.schedule.steps_per_epoch,
            "start_step": self.step, "resumed_from": str(self.resume) if self.resume else None,
            "examples": len(self.train_set), "eval_examples": len(self.eval_set),
            "rows_per_step": cfg.batch_size * cfg.grad_accum, "trainable_params": trainable_params,
            "total_params": total_params, "device": str(self.device), "dataset": self.data.stats.to_dict(),
            "notes": list(self.notes), "config": cfg.to_dict()})

    def _finish(self, status: Literal["completed", "cancelled"]) -> TrainResult:
        """Final eval and checkpoint; a completed run also publishes its weights as the run folder's output."""
        assert self.trainable is not None
        if status == "completed" and self.eval_set and self._last_eval_step() != self.step:
            self._evaluate()
        final = self.saved.get(self.step) or self._checkpoint("cancel" if status == "cancelled" else "final")
        result_path = final
        if status == "completed" and self.writes:
            # The run folder's trainer_state.json too, where the Trainer's save_state() puts it (and tools
            # such as LLaMA-Factory's plot_loss read it).
            ckpt.publish(final, self.out, [*self.trainable.weight_files(final), ckpt.TRAINER_STATE])
            result_path = self.out
        losses = [h["loss"] for h in self.history if h.get("kind") == "train_progress"]
        m = self.meter
        result = TrainResult(
            status=status, method=self.cfg.method, output_dir=str(self.out),
            adapter_path=str(result_path) if self.cfg.method == "lora" else None,
            model_path=str(result_path) if self.cfg.method == "full" else None,
            step=self.step, total_steps=self.total_steps,
            epoch=round(self.step / self.schedule.steps_per_epoch, 4),
            final_loss=losses[-1] if losses else None, best_eval_loss=self.best_eval,
            final_eval_loss=self.last_eval, tokens=m.tokens,
            tokens_per_s=m.tokens / m.train_time if m.train_time > 0 else 0.0,
            elapsed_s=time.perf_counter() - m.started,
            checkpoints=[str(p) for p in ckpt.list_checkpoints(self.out)],
            dataset=self.data.stats.to_dict(), history=self.history,
            resumed_from=str(self.resume) if self.resume else None, notes=self.notes,
            reports=self.reports.locations if self.reports else {},
            preference=self.cfg.preference.method if self.cfg.preference else None,
            final_metrics=self._final_metrics())
        if status == "completed" and self.writes:
            write_text_atomic(self.out / "train_result.json",
                              json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        return result

    def _final_metrics(self) -> dict[str, float]:
        progress = [h for h in self.history if h.get("kind") == "train_progress"]
        if self.cfg.preference is None or not progress:
            return {}
        keys = ("rewards/", "logps/", "nll_loss", "log_odds_")
        return {k: v for k, v in progress[-1].items() if k.startswith(keys)}

    def _train_step(self) -> tuple[float, float, int]:
        """One optimizer step over its micro-batches: (mean token loss, gradient norm, tokens seen)."""
        assert self.runner is not None
        micro = self.schedule.step_units(self.step)
        if self.parallel is not None:
            micro, fillers = self.parallel.shard(micro)
        else:
            fillers = 0
        batches = [self._collate(self.train_set, self.units, ids) for ids in micro]
        if self.graphed is not None and len(batches) == 1 and not fillers:
            stats = self.graphed(batches[0])
        else:
            stats = self.runner(batches, fillers)
        # The one wait for the device per step: the progress events report these values.
        step_loss, grad_norm = float(stats.loss), float(stats.grad_norm)
        self.step_metrics = {name: float(v) for name, v in stats.metrics.items()}
        if not math.isfinite(step_loss):
            raise TrainingError(f"the loss became {step_loss} at step {self.step + 1}; lower lr (now {self.cfg.lr}) "
                                "or use dtype 'fp32' / 'bf16' instead of 'fp16'")
        return step_loss, grad_norm, stats.tokens

    def _loss_sum(self, batch: Batch) -> torch.Tensor:
        assert self.runner is not None
        return self.runner.loss_sum(batch)

    def _save_after_lost_rank(self) -> None:
        """A step of a several-rank run failed (most often a collective, because another rank died). Every
        collective comes before the optimizer step, so this rank still holds the last completed step intact:
        keep it, so the run resumes from there (on one process too) rather than from an older checkpoint."""
        if self.parallel is None or not self.writes or self.step == 0 or self.step in self.saved:
            return
        if self.parallel.sharded:  # the weights are spread over the ranks, one of which is gone
            return
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        self._checkpoint("cancel")

    def _evaluate(self) -> None:
        assert self.trainable is not None
        self.model.eval()
        started = time.perf_counter()
        total, count = 0.0, 0
        sums: dict[str, float] = {}
        assert self.runner is not None
        with torch.no_grad():
            for start in range(0, len(self.eval_set), self.cfg.batch_size):
                ids = list(range(start, min(start + self.cfg.batch_size, len(self.eval_set))))
                batch = self._collate(self.eval_set, [[i] for i in range(len(self.eval_set))], ids)
                loss, metrics = self.runner.loss_and_metrics(batch.to(self.device))
                total += float(loss)
                count += self.runner.objective.count(batch)
                for name, value in metrics.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
        self.model.train()
        self.last_eval = total / count
        extra = {f"eval_{name}": value / count for name, value in sums.items()}
        if self.best_eval is None or self.last_eval < self.best_eval:
            self.best_eval, self.best_eval_step = self.last_eval, self.step
        self._event("eval", {"step": self.step, "eval_loss": self.last_eval, "best_eval_loss": self.best_eval,
                             "eval_tokens": count, "eval_examples": len(self.eval_set),
                             "eval_runtime_s": time.perf_counter() - started, **extra})

    def _last_eval_step(self) -> int | None:
        evals = [h["step"] for h in self.history if h.get("kind") == "eval"]
        return evals[-1] if evals else None

    def _checkpoint(self, reason: str) -> Path:
        assert self.trainable is not None and self.optimizer is not None
        trainable = self.trainable
        write_weights = trainable.save
        if self.parallel is not None and self.parallel.sharded:
            # Gathering whole weights and optimizer state takes every rank; rank 0 then writes them.
            whole = self.parallel.full_model_state(self.model)
            optimizer_state: dict[str, Any] = {**self.parallel.full_optimizer_state(self.model, self.optimizer),
                                               "keys": "names"}
            write_weights = lambda folder: trainable.save(folder, whole)  # noqa: E731
        else:
            optimizer_state = self.optimizer.state_dict()
        training_state = {"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                          "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                          "rng": ckpt.rng_state()}
        run_state = {"step": self.step, "total_steps": self.total_steps, "method": self.cfg.method,
                     "steps_per_epoch": self.schedule.steps_per_epoch,
                     "data_position": self.schedule.position(self.step),
                     "data_fingerprint": self.data.fingerprint(), "best_eval_loss": self.best_eval,
                     "best_eval_step": self.best_eval_step, "last_eval_loss": self.last_eval,
                     "tokens_seen": self._tokens_seen(), "log_history": self.history}
        if self.writes:
            path = ckpt.write_checkpoint(self.out, self.step, write_weights, training_state, run_state,
                                         self.cfg.to_dict(), self._trainer_state())
        else:
            path = self.out / f"checkpoint-{self.step}"
        self.saved[self.step] = path
        self._event("checkpoint", {"step": self.step, "path": str(path), "reason": reason})
        return path

    def _tokens_seen(self) -> int:
        return self.tokens_before + self.meter.tokens

    def _trainer_state(self) -> dict[str, Any]:
        """This checkpoint's trainer_state.json, as Hugging Face's Trainer would write it (hf_state.py)."""
        assert self.trainable is not None
        cfg = self.cfg
        shape = RunShape(max_steps=self.total_steps, steps_per_epoch=self.schedule.steps_per_epoch,
                         logging_steps=cfg.log_every, eval_steps=cfg.eval_every or self.total_steps,
                         save_steps=cfg.save_every or self.total_steps, train_batch_size=cfg.batch_size,
                         total_params=self.trainable.count()[1])
        best = (self.best_eval, self.best_eval_step) if self.best_eval is not None and self.best_eval_step else None
        best_folder = self.saved.get(best[1]) if best else None
        if best and best[1] == self.step:
            best_folder = self.out / f"checkpoint-{self.step}"
        return trainer_state(self.history, shape, step=self.step, tokens_seen=self._tokens_seen(), best=best,
                             best_checkpoint=str(best_folder) if best_folder else None)

    def _event(self, kind: str, content: dict[str, Any]) -> None:
        if kind != "checkpoint":
            self.history.append({"kind": kind, **content})
        self.emit(kind, content)
        if self.reports is not None:
            self.reports(kind, content)

    # -- teardown ------------------------------------------------------------------------------------------
    def oom_message(self, e: BaseException) -> str:
        cfg = self.cfg
        # CUDA's message goes on for several sentences of allocator statistics; the first two say what failed.
        cause = ". ".join(str(e).strip().splitlines()[0].split(". ")[:2]).rstrip(".")
        return (f"out of memory on {self.device} at step {self.step + 1} ({cause}). "
                f"Try a smaller batch_size (now {cfg.batch_size}) with a larger grad_accum (now {cfg.grad_accum}) "
                f"to keep the effective batch, gradient_checkpointing=True"
                f"{'' if not cfg.gradient_checkpointing else ' (already on)'}, or a shorter max_length (now "
                f"{cfg.max_length}). The base model is still loaded and usable.")

    def release(self) -> None:
        # The scheduler and scaler hold the optimizer, whose state (Adam moments) may be GBs on the GPU; a
        # raised error keeps this object alive through its traceback, so drop the references here.
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.optimizer = self.scheduler = self.scaler = None
        self.runner = None
        if self.reports is not None:  # the event files are complete however the run ended
            self.reports.close()
        if self.trainable is not None:
            self.trainable.restore()
            self.trainable = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
