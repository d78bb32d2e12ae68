"""The preference objective of the training step (DPO, ORPO, SimPO) and DPO's reference log-probabilities.

The step runs a pair batch's chosen and rejected rows as one forward pass (batches.collate_pairs), takes each
row's summed answer log-probability (loss.row_logps) and hands them to the loss in preference_loss.py.

DPO's reference is the model before preference tuning, without a second copy of its weights:
- a fresh LoRA adapter: the same model with the adapter switched off (peft's `disable_adapter()`), computed in
  the same step under no_grad;
- full fine-tuning, or LoRA that continues an existing (SFT) adapter: the reference log-probabilities of every
  pair are computed once before the first step, with the model as it starts, and stored in the run folder
  (`reference_logps.json`), so a resumed run reads the same values instead of computing them from trained
  weights. Continuing an adapter makes that adapter both the starting point and the reference, as TRL and
  LLaMA-Factory do (the reference is the model before preference tuning, not the bare base).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from qwenbook_bridge.engine.data.preference_data import PreferenceExample
from qwenbook_bridge.engine.errors import InvalidOptionError
from qwenbook_bridge.engine.files.atomic_write import write_text_atomic
from qwenbook_bridge.engine.train.batches import Batch, collate_pairs
from qwenbook_bridge.engine.train.loss import row_logps
from qwenbook_bridge.engine.train.preference_loss import PairLogps, PairLoss, dpo_loss, orpo_loss, simpo_loss

REFERENCE_FILE = "reference_logps.json"


def pair_logps(causal_lm: Any, batch: Batch) -> PairLogps:
    sums = row_logps(causal_lm, batch)
    assert batch.target_rows is not None
    counts = torch.bincount(batch.target_rows, minlength=batch.input_ids.shape[0]).to(sums.dtype)
    p = batch.pairs
    return PairLogps(sums[:p], sums[p:], counts[:p], counts[p:])


class PreferenceObjective:
    """Sum over a pair batch of the per-pair losses (the step divides by its pair count) and of the metrics."""

    def __init__(self, method: str, beta: float, *, label_smoothing: float = 0.0, gamma: float = 0.0,
                 peft_model: Any = None) -> None:
        self.method, self.beta, self.label_smoothing, self.gamma = method, beta, label_smoothing, gamma
        self.peft_model = peft_model  # for DPO's in-step reference: this model with its adapter switched off

    def count(self, batch: Batch) -> int:
        return batch.pairs

    def pair_loss(self, causal_lm: Any, batch: Batch) -> PairLoss:
        policy = pair_logps(causal_lm, batch)
        if self.method == "orpo":
            return orpo_loss(policy, beta=self.beta)
        if self.method == "simpo":
            return simpo_loss(policy, beta=self.beta, gamma=self.gamma)
        if batch.ref_logps is not None:
            ref = batch.ref_logps
        else:
            if self.peft_model is None:
                raise InvalidOptionError("DPO needs reference log-probabilities: a LoRA run computes them with the "
                                         "adapter switched off, other runs before the first step")
            with torch.no_grad(), self.peft_model.disable_adapter():
                ref = row_logps(causal_lm, batch)
        return dpo_loss(policy, ref[:batch.pairs], ref[batch.pairs:], beta=self.beta,
                        label_smoothing=self.label_smoothing)

    def __call__(self, causal_lm: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.pair_loss(causal_lm, batch)
        return out.losses.sum(), {k: v.sum() for k, v in out.metrics.items()}


def precompute_reference(causal_lm: Any, examples: Sequence[PreferenceExample], *, pad_id: int, batch_size: int,
                         device: torch.device, autocast: torch.dtype | None) -> list[tuple[float, float]]:
    """Each pair's (chosen, rejected) summed log-probability under `causal_lm` as it is now, in eval mode."""
    was_training = causal_lm.training
    causal_lm.eval()
    out: list[tuple[float, float]] = []
    cast = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    with torch.no_grad(), cast:
        for start in range(0, len(examples), batch_size):
            ids = list(range(start, min(start + batch_size, len(examples))))
            batch = collate_pairs(examples, ids, pad_id)
            sums = row_logps(causal_lm, batch.to(device)).float().cpu().tolist()
            out += list(zip(sums[:len(ids)], sums[len(ids):]))
    causal_lm.train(was_training)
    return out


def save_reference(folder: Path, fingerprint: str, values: Sequence[tuple[float, float]]) -> None:
    write_text_atomic(folder / REFERENCE_FILE, json.dumps({"data_fingerprint": fingerprint,
                                                           "logps": [list(v) for v in values]}))


def load_reference(folder: Path, fingerprint: str, n: int) -> list[tuple[float, float]] | None:
    """The stored reference of a run on the same data, or None (absent, or for other data)."""
    path = folder / REFERENCE_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("data_fingerprint") != fingerprint or len(saved.get("logps", [])) != n:
        return None
    return [(float(c), float(r)) for c, r in saved["logps"]]
