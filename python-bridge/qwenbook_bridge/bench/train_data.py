"""The training benchmark's rows and batches: synthetic rows of one fixed length, and the tutorials' own data
(notebooks/data) through the Qwen chat template.

Synthetic rows are one example of exactly the configured length whose first 20-50% is prompt (no loss), the rest
answer; their tokens come from a 1,024-token sub-vocabulary, so the loss falls visibly within a few steps.

Real rows are the engine's own encoding of huanhuan.json and alpaca-mix.json (answer-only labels), repeated to a
few thousand rows. The Hugging Face paths batch them as the tutorials' scripts do (a seeded shuffle, then
`DataCollatorForSeq2Seq` pads each batch to its longest row); the engine's paths batch them as `train()` does
(packed units, the same seeded schedule).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from qwenbook_bridge.engine.data.chat_encoding import IGNORE_INDEX, Example, build_dataset
from qwenbook_bridge.engine.data.datasets import DatasetSpec
from qwenbook_bridge.engine.train.batches import Batch, DataSchedule, collate, make_units

REAL_SOURCES = ("huanhuan.json", "alpaca-mix.json")
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "notebooks" / "data"


def synthetic_rows(vocab: int, count: int, length: int, seed: int) -> list[Example]:
    gen = torch.Generator().manual_seed(seed)
    # Below the special-token range, so a real tokenizer's control tokens are never drawn.
    pool = torch.randperm(min(vocab, 151643), generator=gen)[:1024]
    rows = []
    for i in range(count):
        ids = pool[torch.randint(0, pool.numel(), (length,), generator=gen)].tolist()
        prompt = int(length * (0.2 + 0.3 * torch.rand((), generator=gen).item()))
        rows.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:], "synthetic", i + 1))
    return rows


def real_rows(tokenizer: Any, data_dir: Path, rows: int, max_length: int, seed: int) -> list[Example]:
    """The tutorials' two data sets, `rows` rows in all (each source repeated to half of it), encoded with the
    tokenizer's chat template as `train()` encodes them."""
    missing = [name for name in REAL_SOURCES if not (data_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{data_dir} lacks {missing}: pass --data-dir with the tutorials' notebooks/data")
    specs = [DatasetSpec(source=str(data_dir / name), samples=rows // len(REAL_SOURCES)) for name in REAL_SOURCES]
    return build_dataset(specs, tokenizer, max_length, seed=seed).examples


def pad_id_of(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def hf_real_batches(rows: list[Example], batch: int, steps: int, tokenizer: Any,
                    seed: int) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """What a tutorial's Trainer feeds the model: a seeded shuffle, `batch` rows a step, each batch padded to its
    longest row by `DataCollatorForSeq2Seq` (labels padded with -100). Also each step's example indices."""
    from transformers import DataCollatorForSeq2Seq

    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    order = list(range(len(rows)))
    random.Random(f"hf/{seed}").shuffle(order)
    if len(order) < batch * steps:
        raise ValueError(f"{len(rows)} real rows are too few for {steps} steps of {batch}; raise --real-rows")
    out, picked = [], []
    for s in range(steps):
        picked.append(order[s * batch:(s + 1) * batch])
        features = [{"input_ids": rows[i].input_ids, "attention_mask": [1] * len(rows[i].input_ids),
                     "labels": rows[i].labels} for i in picked[-1]]
        out.append(dict(collator(features)))
    return out, picked


def ours_real_batches(rows: list[Example], batch: int, steps: int, max_length: int, pad_id: int,
                      seed: int) -> tuple[list[Batch], list[list[int]]]:
    """What `train()` feeds its step: examples packed into units of at most `max_length` tokens, `batch` units a
    step in the seeded schedule's order. Also each step's example indices."""
    units = make_units(rows, max_length, True, seed)
    schedule = DataSchedule(len(units), batch, 1, seed)
    if schedule.steps_per_epoch < steps:
        raise ValueError(f"{len(rows)} real rows pack into {len(units)} units, too few for {steps} steps of {batch}; "
                         "raise --real-rows")
    step_units = [schedule.step_units(s)[0] for s in range(steps)]
    return ([collate(rows, units, u, pad_id, True) for u in step_units],
            [[i for unit in u for i in units[unit]] for u in step_units])


def trained_tokens(labels: torch.Tensor) -> int:
    """Tokens the loss is computed on: a label other than -100 at a position after the first of its row."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
