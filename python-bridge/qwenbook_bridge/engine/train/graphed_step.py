"""A whole optimizer step captured once as a CUDA graph and replayed for every later batch of the same shape.

A LoRA step on a 7B model launches thousands of small kernels (seven adapted projections a layer, each a few
GEMMs and casts, forward, recompute and backward, then the clip and AdamW). At 4 rows of 384 tokens the host
takes longer to launch them than the device takes to run them (bench/train_profile.py: about 150 ms of kernels
in a 200 ms step). Replaying a captured graph launches the whole step at once.

What a replay needs is what the capture saw: the same tensor shapes and nothing decided on the host inside the
step. Only batches whose rows each fill the width (`plain_causal`) qualify: for a mask or packed position ids,
transformers asks the device what they hold, which a capture cannot do; other batches run the eager step. The
batch is copied into static tensors (targets padded to a fixed count with ignored ids, so packed
batches with different answer lengths share a graph), the loss is scaled by a device scalar instead of a Python
number, and the learning rate is a device tensor that the scheduler fills in place. Steps run eagerly until a
shape has been seen `warmup` times (autotuning, compiling and the optimizer's state all happen then), and a graph
per shape is captured after that; every graph draws on one memory pool, as only one runs at a time.

`graphable()` says why a run cannot be graphed (gradient accumulation, dropout, a grad scaler, several ranks) or
need not be (micro-batches large enough that launching is not what the step waits on); such runs keep the eager
StepRunner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from qwenbook_bridge.engine.data.chat_encoding import IGNORE_INDEX
from qwenbook_bridge.engine.train.batches import Batch
from qwenbook_bridge.engine.train.step import StepRunner, StepStats
from qwenbook_bridge.engine.train.trainable import decoder_layers

log = logging.getLogger(__name__)

# Targets are padded up to a multiple of this, so packed batches whose answers differ in length share a graph.
TARGET_BUCKET = 256


# Above this many tokens x hidden size in a micro-batch the device is busy enough without a graph: on an H200 a
# 7B-shape LoRA step of 2 x 2048 tokens (14.7 M) took 2% longer replayed (309.4 against 303.6 ms) and kept 0.13 GiB
# more, while one of 4 x 384 (5.5 M) ran in 132 ms replayed against 179 ms eager.
LAUNCH_BOUND_BELOW = 8 * 2**20


def graphable(runner: StepRunner, *, grad_accum: int, dropout: float, step_tokens: int | None = None,
              hidden: int | None = None) -> str | None:
    """None when the run's steps can be captured and are small enough to gain from it; else why not."""
    if runner.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if step_tokens is not None and hidden is not None and step_tokens * hidden >= LAUNCH_BOUND_BELOW:
        return (f"a micro-batch of {step_tokens} tokens at hidden size {hidden} keeps the device busy without one "
                "(replaying a graph saves only launch time)")
    if grad_accum != 1:
        return "gradient accumulation runs several forward passes a step"
    if dropout > 0:
        return "dropout draws random numbers inside the step"
    if runner.scaler is not None:
        return "fp16's loss scaler decides on the host whether to step"
    if runner.parallel is not None or runner.loss_module is not None:
        return "several ranks exchange gradients outside the step"
    return None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    batch: Batch                       # the static inputs the graph reads
    inv_targets: torch.Tensor          # 1 / the step's target count
    loss: torch.Tensor
    grad_norm: torch.Tensor
    metrics: dict[str, torch.Tensor]


class GraphedStep:
    def __init__(self, runner: StepRunner, warmup: int = 3) -> None:
        self.runner, self.warmup = runner, warmup
        self.seen: dict[tuple[Any, ...], int] = {}
        self.graphs: dict[tuple[Any, ...], _Graph] = {}
        self.pool: Any = None
        self._prepared = False
        self.failed: str | None = None  # why capturing failed; every later step then runs eagerly

    def __call__(self, batch: Batch) -> StepStats:
        runner = self.runner
        if not batch.plain_causal or batch.pairs:
            return runner([batch])
        padded = _pad_targets(batch)
        key = _shape_key(padded)
        graph = self.graphs.get(key)
        if graph is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.failed is not None or self.seen[key] <= self.warmup:
                return runner([batch])
            self._prepare()
            try:
                graph = self.graphs[key] = self._capture(padded.to(runner.device))
            except Exception as e:  # noqa: BLE001 - an operation the capture refuses: the eager step still works
                self.failed = f"{type(e).__name__}: {e}"
                log.warning("training steps stay eager: capturing one as a CUDA graph failed (%s)", self.failed)
                runner.optimizer.zero_grad(set_to_none=True)
                return runner([batch])
        _copy_batch(graph.batch, padded)
        graph.inv_targets.fill_(1.0 / runner.objective.count(batch))
        graph.graph.replay()
        if runner.scheduler is not None:
            runner.scheduler.step()  # fills the learning-rate tensors the graph reads
        return StepStats(graph.loss.clone(), graph.grad_norm.clone(), batch.tokens,
                         {k: v.clone() for k, v in graph.metrics.items()})

    def _prepare(self) -> None:
        """Once, before the first capture: what the eager steps left as host values becomes device state."""
        if self._prepared:
            return
        self._prepared = True
        device = self.runner.device
        for group in self.runner.optimizer.param_groups:
            group["capturable"] = True
            # A float learning rate would be baked into the graph; a tensor is read at every replay.
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        for layer in decoder_layers(self.runner.trainable.causal_lm):
            if getattr(layer, "gradient_checkpointing", False):
                # No random numbers are drawn in the step (no dropout), so the recompute needs no RNG state, and
                # reading it is not allowed while capturing.
                layer._gradient_checkpointing_func = _checkpoint_without_rng

    def _capture(self, batch: Batch) -> _Graph:
        runner = self.runner
        torch.cuda.empty_cache()  # the eager steps' cached blocks: the graph's pool holds its own working set
        inv = torch.ones((), dtype=torch.float32, device=runner.device)
        stream = torch.cuda.Stream(runner.device)
        stream.wait_stream(torch.cuda.current_stream(runner.device))
        with torch.cuda.stream(stream):
            # One eager pass on the capture stream first, as CUDA graph capture asks (lazy initialisation of
            # cuBLAS workspaces and the like happens outside the graph), without changing the weights.
            loss, _ = runner.loss_and_metrics(batch)
            (loss * inv).backward()
            runner.optimizer.zero_grad(set_to_none=True)
        torch.cuda.current_stream(runner.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        caller = torch.cuda.current_stream(runner.device)
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                loss, sums = runner.loss_and_metrics(batch)
                loss = loss * inv
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(runner.params, runner.max_norm)
                runner.optimizer.step()
                runner.optimizer.zero_grad(set_to_none=True)
                out = _Graph(graph, batch, inv, loss.detach(), grad_norm.detach(),
                             {k: (v * inv).detach() for k, v in sums.items()})
        finally:
            # A capture that fails raises out of torch.cuda.graph's exit before it restores the caller's stream:
            # the eager steps that follow would run on the capture stream, whose failed capture still counts as
            # capturing for the code that asks (transformers then builds other masks in forward than in the
            # checkpoint's recompute).
            torch.cuda.set_stream(caller)
        self.pool = graph.pool()
        return out


def _checkpoint_without_rng(function: Any, *args: Any, **kwargs: Any) -> Any:
    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def _pad_targets(batch: Batch) -> Batch:
    """The batch with its target positions padded to a multiple of TARGET_BUCKET: index 0, id IGNORE_INDEX (the
    token loss skips them). Preference batches (pairs) are left as they are: their per-row sums have no ignored
    ids to skip, so they are not captured."""
    if batch.target_index is None or batch.target_ids is None or batch.pairs:
        return batch
    n = batch.target_index.shape[0]
    size = -(-n // TARGET_BUCKET) * TARGET_BUCKET
    if size == n:
        return batch

    def pad(t: torch.Tensor | None, value: int) -> torch.Tensor | None:
        if t is None:
            return None
        out = torch.full((size,), value, dtype=t.dtype, device=t.device)
        out[:n] = t
        return out

    return replace(batch, target_index=pad(batch.target_index, 0), target_ids=pad(batch.target_ids, IGNORE_INDEX),
                   target_rows=pad(batch.target_rows, 0))


def _tensors(batch: Batch) -> list[tuple[str, torch.Tensor | None]]:
    return [(name, getattr(batch, name)) for name in ("input_ids", "labels", "position_ids", "attention_mask",
                                                      "target_index", "target_ids", "target_rows", "ref_logps")]


def _shape_key(batch: Batch) -> tuple[Any, ...]:
    return (batch.plain_causal, batch.pairs,
            *((name, None if t is None else tuple(t.shape)) for name, t in _tensors(batch)))


def _copy_batch(static: Batch, batch: Batch) -> None:
    for (_, dst), (_, src) in zip(_tensors(static), _tensors(batch)):
        if dst is not None and src is not None:
            dst.copy_(src, non_blocking=True)
