"""Batches for the training loop: which examples go into each optimizer step, deterministically from a seed.

A "unit" is one row of a batch: one example, or with packing several examples laid end to end. Step `s`
always gets the same micro-batches for the same data and seed, which is what lets a resumed run continue
exactly where an uninterrupted one would be.

Packed rows carry position ids that restart at 0 for every example and no attention mask: transformers then
builds a block-diagonal causal mask from the position ids (flash-attention reads them directly), so packed
examples never attend to each other.

Everything the loss needs to know about the batch's shape (which positions are trained, whether the rows are
plain causal sequences) is worked out here on the host, so the training step never has to wait for the device
to answer a question about its own inputs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qwenbook_bridge.engine.data.chat_encoding import IGNORE_INDEX, Example
from qwenbook_bridge.engine.data.preference_data import PreferenceExample


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    tokens: int    # real (non-padding) tokens, for tokens/s
    targets: int   # tokens the loss is computed on
    # Flat indices (row * width + column) of the positions whose next token is a target, and those tokens.
    target_index: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None
    # Every row is one example filling the whole width: a plain causal mask and positions 0.. are exactly
    # right, so the model needs neither mask nor position ids (and does not inspect them on the device).
    plain_causal: bool = False
    # The row of each target (for per-row log-probabilities: preference losses).
    target_rows: torch.Tensor | None = None
    # Preference batches: rows [chosen of each pair..., rejected of each pair...]; `pairs` is how many pairs.
    pairs: int = 0
    # The reference model's summed log-probability of each row, where it was computed before training
    # (full fine-tuning, or a run that starts from an adapter); None: computed in the step.
    ref_logps: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device, non_blocking=True) if t is not None else None

        return Batch(self.input_ids.to(device, non_blocking=True), self.labels.to(device, non_blocking=True),
                     self.position_ids.to(device, non_blocking=True), move(self.attention_mask), self.tokens,
                     self.targets, move(self.target_index), move(self.target_ids), self.plain_causal,
                     move(self.target_rows), self.pairs, move(self.ref_logps))


def split_eval(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded random `fraction` of the examples is held out (at least one when fraction > 0)."""
    if fraction <= 0:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(f"eval/{seed}").shuffle(order)
    n_eval = max(1, round(fraction * len(examples)))
    held = set(order[:n_eval])
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])


def make_units(examples: Sequence[Example], max_length: int, packing: bool, seed: int) -> list[list[int]]:
    if not packing:
        return [[i] for i in range(len(examples))]
    order = list(range(len(examples)))
    random.Random(f"pack/{seed}").shuffle(order)
    units: list[list[int]] = []
    current: list[int] = []
    length = 0
    for i in order:
        n = len(examples[i].input_ids)
        if current and length + n > max_length:
            units.append(current)
            current, length = [], 0
        current.append(i)
        length += n
    if current:
        units.append(current)
    return units


class DataSchedule:
    """Maps an optimizer step to its micro-batches (lists of units) for a fixed seed."""

    def __init__(self, n_units: int, batch_size: int, grad_accum: int, seed: int) -> None:
        self.n_units, self.batch_size, self.grad_accum, self.seed = n_units, batch_size, grad_accum, seed
        self.micro_per_epoch = math.ceil(n_units / batch_size)
        # The last step of an epoch may have fewer micro-batches, so no example is skipped or repeated.
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / grad_accum)
        self._orders: dict[int, list[int]] = {}

    def epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(self.n_units))
            random.Random(f"order/{self.seed}/{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def position(self, step: int) -> dict[str, int]:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "step_in_epoch": in_epoch,
                "micro_batches_done": min(in_epoch * self.grad_accum, self.micro_per_epoch)}

    def step_units(self, step: int) -> list[list[int]]:
        """The units of each micro-batch of optimizer step `step` (0-based)."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        first = in_epoch * self.grad_accum
        last = min(first + self.grad_accum, self.micro_per_epoch)
        return [order[m * self.batch_size:(m + 1) * self.batch_size] for m in range(first, last)]


def collate(examples: Sequence[Example], units: Sequence[Sequence[int]], unit_ids: Sequence[int], pad_id: int,
            packing: bool) -> Batch:
    """Right-padded tensors for the given units; see the module doc for how packed rows are laid out."""
    rows: list[tuple[list[int], list[int], list[int]]] = []
    for u in unit_ids:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in units[u]:
            ex = examples[i]
            ids += ex.input_ids
            labels += ex.labels
            positions += range(len(ex.input_ids))
        # The first token of each packed example must not be a target for the previous example's last token.
        labels = _mask_example_starts(labels, positions)
        rows.append((ids, labels, positions))
    width = max(len(r[0]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    tokens = 0
    for r, (ids, labels, positions) in enumerate(rows):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids)
        labels_t[r, :n] = torch.tensor(labels)
        position_ids[r, :n] = torch.tensor(positions)
        # Padding in a packed row is its own block (positions from 0), so no real token attends to it.
        position_ids[r, n:] = torch.arange(width - n)
        mask[r, :n] = 1
        tokens += n
    shifted = labels_t[:, 1:]
    rows_i, cols_i = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
    plain = all(len(units[u]) == 1 and len(r[0]) == width for u, r in zip(unit_ids, rows))
    return Batch(input_ids, labels_t, position_ids, None if packing else mask, tokens, int(rows_i.numel()),
                 target_index=rows_i * width + cols_i, target_ids=shifted[rows_i, cols_i], plain_causal=plain,
                 target_rows=rows_i)


def _mask_example_starts(labels: list[int], positions: list[int]) -> list[int]:
    return [IGNORE_INDEX if p == 0 else x for x, p in zip(labels, positions)]


def collate_pairs(pairs: Sequence[PreferenceExample], pair_ids: Sequence[int], pad_id: int) -> Batch:
    """One batch of the chosen rows of `pair_ids` followed by their rejected rows, so the policy scores both
    answers of every pair in one forward pass; with each pair's reference log-probabilities when they were
    computed before training."""
    rows = [pairs[i].chosen for i in pair_ids] + [pairs[i].rejected for i in pair_ids]
    batch = collate(rows, [[k] for k in range(len(rows))], range(len(rows)), pad_id, False)
    batch.pairs = len(pair_ids)
    refs = [pairs[i].ref_logps for i in pair_ids]
    if all(r is not None for r in refs):
        batch.ref_logps = torch.tensor([r[0] for r in refs if r] + [r[1] for r in refs if r], dtype=torch.float32)
    return batch
