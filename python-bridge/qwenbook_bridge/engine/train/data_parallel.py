"""Data-parallel training over the ranks of a torch.distributed group (one process per device).

The training loop stays the one in training.py; this object is what changes when several ranks share a step.
The run is configured with the GLOBAL grad_accum (per-rank grad_accum × world size), so the data schedule, the
number of steps, the learning-rate schedule and every checkpoint are exactly those of one process with the same
global batch. Each rank then takes its own slice of the step's micro-batches, the loss is normalized by the
target count of the whole step (summed over ranks), and the gradients are summed over ranks before clipping:
the update is the one-process update up to floating-point summation order.

Gradients are reduced once per step in one flat buffer: LoRA's trainable weights are small, so this costs one
collective per optimizer step, the same as DDP with `no_sync` over the accumulation micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DataParallel:
    rank: int
    world_size: int
    device: torch.device  # where collectives run: the rank's GPU under nccl, the CPU under gloo
    sharded: ClassVar[bool] = False  # weights split over the ranks (fsdp.py), not a whole model on each

    @property
    def loss_scale(self) -> float:
        """What backward's loss is multiplied by so the reduced gradients are the sum over ranks."""
        return 1.0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """Called once the model is ready to train, before the optimizer sees its parameters; returns the module
        the loss must run through, or None for the model as it is."""
        return None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, micro_batches: Sequence[T]) -> tuple[list[T], int]:
        """This rank's contiguous share of a step's micro-batches (a short last step may leave a rank none),
        and how many of them at the end are fillers that must count for nothing (none here)."""
        n = len(micro_batches)
        per, extra = divmod(n, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return list(micro_batches[start:start + per + (1 if self.rank < extra else 0)]), 0

    def local(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def sum_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    @staticmethod
    def is_peer_failure(e: BaseException) -> bool:
        """Whether `e` came from a collective that failed, most often because another rank died."""
        if isinstance(e, dist.DistError):
            return True
        text = str(e).lower()
        return isinstance(e, RuntimeError) and any(
            w in text for w in ("connection reset", "connection closed", "closed by peer", "broken pipe", "timed out"))

    def any_(self, flag: bool) -> bool:
        """True on every rank when it is True on any rank."""
        return self.sum_int(int(flag)) > 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks in place (moved through the collective device when it lives elsewhere)."""
        moved = tensor.to(self.device)
        dist.all_reduce(moved)
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def sync_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over ranks; a rank that saw no rows this step contributes zeros."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).to(self.device, torch.float32) for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def broadcast_parameters(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Start every rank from rank 0's weights, as DDP does when it wraps a module."""
        with torch.no_grad():
            for p in params:
                moved = p.data.to(self.device)
                dist.broadcast(moved, src=0)
                if moved is not p.data:
                    p.data.copy_(moved)

    def barrier(self) -> None:
        dist.barrier()

    def memory(self) -> list[dict[str, int | str]]:
        """Every rank's memory (its GPU's tensors, or its process on a CPU), gathered on every rank."""
        if self.device.type == "cuda":
            used, peak = torch.cuda.memory_allocated(self.device), torch.cuda.max_memory_allocated(self.device)
            props = torch.cuda.get_device_properties(self.device)
            name, total = props.name, props.total_memory
        else:
            import psutil

            used = peak = psutil.Process().memory_info().rss
            name, total = "process memory (RSS)", psutil.virtual_memory().total
        mine = {"rank": self.rank, "device": str(self.device), "name": name, "used": int(used), "peak": int(peak),
                "total": int(total)}
        everyone: list[dict[str, int | str]] = [mine] * self.world_size
        dist.all_gather_object(everyone, mine)
        return everyone
