"""Selective activation checkpointing for LoRA runs: what a decoder layer keeps for backward and what it
recomputes, spending a memory budget on less recompute.

Gradient checkpointing keeps a layer's input and recomputes the whole layer in backward: about a third more matrix
work per step. A selective layer keeps instead

- the narrow projections' outputs, each with its adapter's product added (q, k, v, o; the MLP's down output is
  not needed by backward), attention's output and its log-sum-exp, and the adapters' [tokens, r] products;
- and, in the layers that may also keep wide activations, the MLP's gate and up outputs;

and recomputes the rest: norms, RoPE, the activation, and (where not kept) gate and up. Every projection's output
saves 2 x in_features FLOPs of recompute per stored value, so the order of choice hardly matters: the narrow set
first, because it also spares attention and many small kernels, then the wide pairs.

It pays under torch.compile, whose partitioner drops recomputation that backward does not need (a base product
that only fed a kept sum); eager recomputation replays every op of the layer, so the trainer applies this only to
compiled runs (`apply` itself works either way, which the CPU tests use).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_ATTENTION_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                  "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_flash_attention_forward", "_efficient_attention_forward")


@dataclass(frozen=True)
class Plan:
    selective: int  # layers (the last ones) that keep their narrow activations instead of only their input
    wide: int       # of those, layers (the last ones) that also keep gate and up: no recompute at all
    narrow_bytes: int  # per selective layer
    wide_bytes: int    # per wide layer, on top

    @property
    def extra_bytes(self) -> int:
        return self.selective * self.narrow_bytes + self.wide * self.wide_bytes


def plan(config: Any, layers: int, tokens: int, dtype_bytes: int, budget_bytes: float) -> Plan:
    """How many layers keep what, for micro-batches of `tokens` tokens, within `budget_bytes` of extra memory."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    narrow = tokens * dtype_bytes * (2 * q + 2 * kv + config.hidden_size) + tokens * 4 * config.num_attention_heads
    wide = tokens * dtype_bytes * 2 * config.intermediate_size
    selective = min(layers, int(max(0.0, budget_bytes) // narrow))
    keep_wide = min(selective, int(max(0.0, budget_bytes - selective * narrow) // wide))
    return Plan(selective, keep_wide, narrow, wide)


def auto_budget(free_bytes: int | None, quantized: bool) -> float:
    """The budget when the run names none: a quarter of the device memory free once the model is loaded, none
    on a CPU (`free_bytes` None) or over an int8/int4 base, whose users chose it to save memory (QLoRA)."""
    return 0.0 if free_bytes is None or quantized else 0.25 * free_bytes


def _policy(hidden: int, rank: int, keep_wide: bool) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    attention = {getattr(aten, n).default for n in _ATTENTION_OPS if hasattr(aten, n)}

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        if op in attention:
            return CheckpointPolicy.MUST_SAVE
        if op is aten.addmm.default and args[1].shape[-1] == rank and (keep_wide or args[2].shape[-1] <= hidden):
            # A projection's output with its adapter's product added (the inner size is the rank). A base product
            # (with a bias it is an addmm too, over in_features) only feeds this sum and is never needed again.
            return CheckpointPolicy.MUST_SAVE
        if op is aten.mm.default and args[1].shape[-1] == rank:
            return CheckpointPolicy.MUST_SAVE  # x @ A^T, [tokens, r]
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


# One context function per (hidden size, rank, keeps wide): a compiled layer's graph is shared by every layer whose
# forward is the same code, so the two kinds of layer get two functions (below) rather than two closures of one.
_contexts: dict[tuple[int, int, bool], Any] = {}


def _context(hidden: int, rank: int, keep_wide: bool) -> Any:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    key = (hidden, rank, keep_wide)
    if key not in _contexts:
        _contexts[key] = functools.partial(create_selective_checkpoint_contexts, _policy(hidden, rank, keep_wide))
    return _contexts[key]


def _narrow_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    if not (self.training and torch.is_grad_enabled()):  # evaluation, a reference pass: nothing to keep
        return self._selective_plain_forward(*args, **kwargs)
    return checkpoint(self._selective_plain_forward, *args, use_reentrant=False,
                      context_fn=_contexts[(*self._selective_shape, False)], **kwargs)


def _wide_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    if not (self.training and torch.is_grad_enabled()):
        return self._selective_plain_forward(*args, **kwargs)
    return checkpoint(self._selective_plain_forward, *args, use_reentrant=False,
                      context_fn=_contexts[(*self._selective_shape, True)], **kwargs)


def apply(layers: list[nn.Module], chosen: Plan, hidden: int, rank: int) -> None:
    """Make the last `chosen.selective` of `layers` (decoder layers with peft LoRA of rank `rank` inside, not yet
    run compiled) selective; the others keep whatever checkpointing they have."""
    from qwenbook_bridge.engine.train import fast_lora

    first, first_wide = len(layers) - chosen.selective, len(layers) - chosen.wide
    for i, layer in enumerate(layers[first:], start=first):
        keep = i >= first_wide
        _context(hidden, rank, keep)
        fast_lora.set_traceable(layer, True)
        layer._selective_was_checkpointed = getattr(layer, "gradient_checkpointing", False)
        layer.gradient_checkpointing = False  # transformers' whole-layer checkpoint off: this one instead
        layer._selective_shape = (hidden, rank)
        layer._selective_plain_forward = layer.forward
        layer.forward = types.MethodType(_wide_forward if keep else _narrow_forward, layer)


def remove(layers: list[nn.Module]) -> None:
    """Undo `apply`: the layers run and checkpoint as before."""
    from qwenbook_bridge.engine.train import fast_lora

    for layer in layers:
        if "_selective_plain_forward" not in layer.__dict__:
            continue
        del layer.forward
        layer.gradient_checkpointing = layer._selective_was_checkpointed
        for name in ("_selective_plain_forward", "_selective_shape", "_selective_was_checkpointed"):
            delattr(layer, name)
        fast_lora.set_traceable(layer, False)
