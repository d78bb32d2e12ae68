"""The parts of the CUDA-graph step that a CPU can check: which runs may be captured and why not, and that
padding a batch's targets to the graph's fixed count leaves the loss as it was. (Replays against eager steps:
python-bridge/tests_gpu/test_graphed_step_cuda.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from qwenbook_bridge.bench.train_data import synthetic_rows
from qwenbook_bridge.engine.train.batches import collate
from qwenbook_bridge.engine.train.graphed_step import TARGET_BUCKET, _pad_targets, graphable
from qwenbook_bridge.engine.train.loss import token_loss_sum


def runner(**over):
    fields = {"device": torch.device("cuda"), "scaler": None, "parallel": None, "loss_module": None, **over}
    return SimpleNamespace(**fields)


def test_only_runs_without_host_decisions_inside_a_step_are_captured():
    assert graphable(runner(), grad_accum=1, dropout=0.0) is None
    assert "CUDA" in graphable(runner(device=torch.device("cpu")), grad_accum=1, dropout=0.0)
    assert "accumulation" in graphable(runner(), grad_accum=2, dropout=0.0)
    assert "dropout" in graphable(runner(), grad_accum=1, dropout=0.1)
    assert "scaler" in graphable(runner(scaler=object()), grad_accum=1, dropout=0.0)
    assert "ranks" in graphable(runner(parallel=object()), grad_accum=1, dropout=0.0)


def test_padded_targets_leave_the_loss_unchanged(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows = synthetic_rows(model.config.vocab_size, 2, 70, seed=1)
    batch = collate(rows, [[0], [1]], [0, 1], 0, True)
    assert batch.plain_causal and batch.target_index is not None
    padded = _pad_targets(batch)
    n = batch.target_index.shape[0]
    assert padded.target_index.shape[0] == TARGET_BUCKET > n
    assert torch.equal(padded.target_index[:n], batch.target_index)
    with torch.no_grad():
        want, got = token_loss_sum(model, batch), token_loss_sum(model, padded)
    assert torch.allclose(got, want, rtol=1e-6), (got, want)
