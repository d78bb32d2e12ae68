"""Summed next-token cross-entropy over the trained positions only.

Only answer tokens need logits, and with a 150k-token vocabulary the logits are most of the memory, so the
output head runs on the selected hidden states alone, in chunks that are recomputed in the backward pass.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qwenbook_bridge.engine.train.batches import Batch
from qwenbook_bridge.engine.data.chat_encoding import IGNORE_INDEX

# 1,024 rows x 152k vocabulary x 4 bytes is ~620 MB of fp32 logits per chunk.
CHUNK_ROWS = 1024


def _head_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def _answer_states(causal_lm: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states of the positions whose next token is trained, those next tokens)."""
    decoder = causal_lm.get_decoder()
    if batch.plain_causal:
        # No mask and no position ids: transformers then uses the causal kernel directly instead of checking
        # on the device whether the mask or the positions hold anything unusual (a host sync per forward).
        out = decoder(input_ids=batch.input_ids, attention_mask=_causal_masks(decoder), use_cache=False)
    else:
        out = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, use_cache=False)
    states = out.last_hidden_state
    if batch.target_index is not None and batch.target_ids is not None:
        # Indices worked out on the host: selecting with a boolean mask would wait for the device to count.
        hidden = states.reshape(-1, states.shape[-1]).index_select(0, batch.target_index)
        return hidden, batch.target_ids
    labels = batch.labels[:, 1:]
    selected = labels != IGNORE_INDEX
    return states[:, :-1][selected], labels[selected]


def _causal_masks(decoder: Any) -> dict[str, None] | None:
    """Every layer's mask for rows that fill the width, as transformers' decoders take it ready-made: None, which
    the attention kernels run as plain causal attention. Left to itself, transformers decides on each call whether
    to build an explicit mask, and decides differently while a CUDA graph is being captured (graphed_step.py): a
    compiled layer then meets a new input, recompiles inside the capture and the capture fails. Sliding-window
    layers need their mask, and a decoder that takes no ready-made masks gets None (transformers decides)."""
    types = {getattr(layer, "attention_type", "full_attention") for layer in getattr(decoder, "layers", ())}
    if types != {"full_attention"} or not _takes_mask_mapping(type(decoder)):
        return None
    return {"full_attention": None}


@functools.cache
def _takes_mask_mapping(decoder_class: type) -> bool:
    """Whether the decoder's forward accepts {attention type: mask} for attention_mask (transformers' decoders
    since 4.53 check `isinstance(attention_mask, dict)` and then skip building masks)."""
    try:
        source = inspect.getsource(decoder_class.forward)
    except (OSError, TypeError):
        return False
    return "causal_mask_mapping := attention_mask, dict" in source


def token_loss_sum(causal_lm: Any, batch: Batch) -> torch.Tensor:
    """Sum of the per-token losses of `batch` (divide by the step's target count to get the mean).

    `causal_lm` is the transformers CausalLM model (with any LoRA layers injected into it)."""
    head = causal_lm.get_output_embeddings()
    hidden, targets = _answer_states(causal_lm, batch)
    rows = targets.shape[0]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows, CHUNK_ROWS):
        h, t = hidden[start:start + CHUNK_ROWS], targets[start:start + CHUNK_ROWS]
        if torch.is_grad_enabled() and rows > CHUNK_ROWS:
            total = total + checkpoint(_head_loss, head, h, t, use_reentrant=False,
                                        preserve_rng_state=False)  # no random numbers in the head
        else:
            total = total + _head_loss(head, h, t)
    return total


def _head_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


def row_logps(causal_lm: Any, batch: Batch) -> torch.Tensor:
    """Each row's log-probability of its trained tokens, summed ([rows], fp32): what preference losses compare.
    The head runs on the trained positions only, in recomputed chunks, as for token_loss_sum."""
    assert batch.target_rows is not None, "row_logps needs a batch collated with target_rows"
    head = causal_lm.get_output_embeddings()
    hidden, targets = _answer_states(causal_lm, batch)
    n = targets.shape[0]
    pieces = []
    for start in range(0, n, CHUNK_ROWS):
        h, t = hidden[start:start + CHUNK_ROWS], targets[start:start + CHUNK_ROWS]
        if torch.is_grad_enabled() and n > CHUNK_ROWS:
            pieces.append(checkpoint(_head_logps, head, h, t, use_reentrant=False))
        else:
            pieces.append(_head_logps(head, h, t))
    per_token = torch.cat(pieces) if pieces else hidden.new_zeros((0,), dtype=torch.float32)
    sums = per_token.new_zeros((batch.input_ids.shape[0],))
    return sums.index_add(0, batch.target_rows, per_token)
