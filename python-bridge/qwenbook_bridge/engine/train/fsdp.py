"""Sharded data parallelism with PyTorch's FSDP2 (`fully_shard`): each rank keeps 1/world of every decoder
layer's weights, gradients and optimizer state, gathering a layer's weights only while it runs.

It plugs into the same training loop as DataParallel (one process per device, the GLOBAL grad_accum, each
rank a slice of every step's micro-batches), with these differences:
- gradients are reduce-scattered by FSDP during backward; FSDP averages them over ranks, so backward runs on
  the loss times the world size to get their sum (the loss is already a share of the whole step's), and
  there is nothing left to synchronize after it;
- every rank runs the same number of forward/backward passes, because each pass gathers weights from all
  ranks: a rank short of micro-batches in a step runs a filler that counts for nothing;
- checkpoints hold full (unsharded) weights and optimizer state keyed by parameter name, gathered from every
  rank and written by rank 0, so a checkpoint resumes on any number of ranks, or on one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from qwenbook_bridge.engine.train.data_parallel import DataParallel

T = TypeVar("T")


def _state_options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


@dataclass(frozen=True)
class ShardedParallel(DataParallel):
    sharded: ClassVar[bool] = True

    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard each decoder layer on its own (so one layer's weights are whole at a time), then the rest;
        returns the module the loss must run through (see _LossModule)."""
        from torch.distributed.fsdp import fully_shard

        from qwenbook_bridge.engine.train.trainable import decoder_layers

        layers = decoder_layers(model)
        if not layers:
            raise TypeError(f"{type(model).__name__} has no decoder layers FSDP can shard one by one")
        for layer in layers:
            fully_shard(layer)
        root = _LossModule(model)
        fully_shard(root)
        return root

    @property
    def loss_scale(self) -> float:
        # FSDP averages gradients over ranks; the loss is already a share of the whole step's, so undo that.
        # (Setting the divide factor to 1 instead needs PREMUL_SUM, which gloo lacks.)
        return float(self.world_size)

    def shard(self, micro_batches: Sequence[T]) -> tuple[list[T], int]:
        mine, _ = super().shard(micro_batches)
        most = -(-len(micro_batches) // self.world_size)
        fillers = most - len(mine)
        return mine + [micro_batches[0]] * fillers, fillers

    def sync_gradients(self, params: Sequence[nn.Parameter]) -> None:
        pass  # reduce-scattered during backward

    def broadcast_parameters(self, params: Sequence[nn.Parameter]) -> None:
        pass  # every rank loaded the same files and seeded the same initialization before sharding

    def local(self, value: torch.Tensor) -> torch.Tensor:
        """A sharded reduction (the gradient norm) as a plain tensor."""
        from torch.distributed.tensor import DTensor

        return value.full_tensor() if isinstance(value, DTensor) else value

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every weight whole, on the CPU of rank 0 (other ranks get an empty dict); a collective."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_state_options(cpu_offload=True))

    def full_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_state_options(cpu_offload=True))

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_state_options())


def restore_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, training: dict[str, Any],
                      parallel: DataParallel | None, checkpoint: Any) -> None:
    """Load a checkpoint's optimizer state, in either key format: by position (one process and ddp runs) or by
    parameter name (sharded runs, which load into any number of ranks, one process included)."""
    from qwenbook_bridge.engine.errors import InvalidOptionError

    state = dict(training["optimizer"])
    sharded = parallel is not None and parallel.sharded
    if state.pop("keys", None) == "names":
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_state_options())
    elif sharded:
        raise InvalidOptionError(f"{checkpoint} was written by a one-process or ddp run; resume it on one process "
                                 "or with strategy 'ddp' (a sharded run reads checkpoints written by sharded runs)")
    else:
        optimizer.load_state_dict(state)


class _LossModule(nn.Module):
    """The loss (engine/train/loss.py) runs the decoder and the output head as two calls, never the model's own
    forward; FSDP2 needs one root module whose forward starts each pass, so this is it. It holds the decoder
    and the head (a head tied to the embedding stays in the same group) and nothing else."""

    def __init__(self, causal_lm: nn.Module) -> None:
        super().__init__()
        self.decoder = causal_lm.get_decoder()
        self.head = causal_lm.get_output_embeddings()
        self._causal_lm = [causal_lm]  # a list, so it is not registered as a second owner of every weight

    def forward(self, batch: Any) -> torch.Tensor:
        from qwenbook_bridge.engine.train.loss import token_loss_sum

        return token_loss_sum(self._causal_lm[0], batch)
