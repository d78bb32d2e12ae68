"""One optimizer step of the training loop, queued on the device without waiting for it.

The step returns its loss and gradient norm as device tensors: nothing in it asks the device for a value, so
the host can queue the next step's work while the device is still busy with this one. The caller decides
when to read them (the loop in training.py reads them once per step, to report and to stop on a non-finite
loss; the benchmark reads them at the end).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from qwenbook_bridge.engine.train.data_parallel import DataParallel
from qwenbook_bridge.engine.train.batches import Batch
from qwenbook_bridge.engine.train.loss import token_loss_sum
from qwenbook_bridge.engine.train.trainable import Trainable
from qwenbook_bridge.engine.train.config import TrainConfig


@dataclass
class StepStats:
    loss: torch.Tensor        # 0-d fp32: the step's mean loss (per token, or per pair for preference losses)
    grad_norm: torch.Tensor   # 0-d: the global gradient norm before clipping
    tokens: int               # real (non-padding) tokens the step saw
    # The objective's other per-step means (preference rewards, accuracies, ...), 0-d device tensors.
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(Protocol):
    """What a step minimizes: a sum over a micro-batch that the step divides by its `count` summed over the step
    (answer tokens for supervised training, pairs for preference losses), and metrics summed the same way."""

    def count(self, batch: Batch) -> int: ...

    def __call__(self, causal_lm: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class TokenObjective:
    """Supervised fine-tuning: the summed next-token loss of the answer tokens."""

    def count(self, batch: Batch) -> int:
        return batch.targets

    def __call__(self, causal_lm: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return token_loss_sum(causal_lm, batch), {}


def build_optimizer(params: Sequence[torch.nn.Parameter], config: TrainConfig,
                    device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    # The fused CUDA kernel updates every parameter in a few launches instead of several per tensor (LoRA on a
    # 7B model has ~400 small tensors); same arithmetic.
    fused = device.type == "cuda" and not _sharded(params)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=config.adam_betas, eps=config.adam_eps, fused=fused or None)


def _sharded(params: Sequence[torch.nn.Parameter]) -> bool:
    """FSDP2's parameters are DTensors, which the fused AdamW kernel may not take; foreach handles them."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in params)


class StepRunner:
    def __init__(self, trainable: Trainable, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 max_grad_norm: float, autocast: torch.dtype | None = None, scheduler: Any = None,
                 scaler: torch.amp.GradScaler | None = None, parallel: DataParallel | None = None,
                 loss_module: torch.nn.Module | None = None, objective: Objective | None = None) -> None:
        self.trainable, self.optimizer, self.device = trainable, optimizer, device
        self.objective: Objective = objective or TokenObjective()
        self.loss_module = loss_module  # what a sharded model's loss runs through (fsdp.py)
        self.parallel = parallel
        self.max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
        self.autocast, self.scheduler, self.scaler = autocast, scheduler, scaler
        self.params = trainable.parameters()

    def loss_sum(self, batch: Batch) -> torch.Tensor:
        return self.loss_and_metrics(batch)[0]

    def loss_and_metrics(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.autocast is None:
            return self._loss(batch)
        with torch.autocast(self.device.type, dtype=self.autocast):
            return self._loss(batch)

    def _loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.loss_module is not None:
            return self.loss_module(batch), {}
        return self.objective(self.trainable.causal_lm, batch)

    def __call__(self, batches: Sequence[Batch], fillers: int = 0) -> StepStats:
        """One step over `batches`; the last `fillers` of them only keep this rank in step with the others
        (sharded ranks gather weights together on every pass) and count for nothing."""
        real = len(batches) - fillers
        # Normalizing by the whole step's target count makes the loss independent of how rows split into
        # micro-batches (a plain mean of per-batch means would weight short batches up).
        targets = sum(self.objective.count(b) for b in batches[:real])
        if self.parallel is not None:  # the whole step's count, so ranks' summed gradients are the one-process one
            targets = self.parallel.sum_int(targets)
        step_loss = torch.zeros((), dtype=torch.float32, device=self.device)
        metrics: dict[str, torch.Tensor] = {}
        tokens = 0
        for i, batch in enumerate(batches):
            loss, sums = self.loss_and_metrics(batch.to(self.device))
            loss = loss / targets
            if i >= real:
                loss = loss * 0.0
            grad_loss = loss if self.parallel is None or self.parallel.loss_scale == 1 else loss * self.parallel.loss_scale
            (self.scaler.scale(grad_loss) if self.scaler is not None else grad_loss).backward()
            if i < real:
                step_loss += loss.detach()
                tokens += batch.tokens
                for name, value in sums.items():
                    metrics[name] = metrics[name] + value / targets if name in metrics else value / targets
        if self.parallel is not None:
            self.parallel.sync_gradients(self.params)
            self.parallel.sum_(step_loss)
            tokens = self.parallel.sum_int(tokens)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        if self.parallel is not None:
            grad_norm = self.parallel.local(grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return StepStats(step_loss, grad_norm.detach(), tokens, metrics)
