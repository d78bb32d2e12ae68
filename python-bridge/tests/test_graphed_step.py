"""The parts of the CUDA-graph step that a CPU can check: which runs may be captured and why not, and that
padding a batch's targets to the graph's fixed count leaves the loss as it was. (Replays against eager steps:
python-bridge/tests_gpu/test_graphed_step_cuda.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
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


def test_micro_batches_that_keep_the_device_busy_are_not_captured():
    # The 7B shape (hidden 3584): 4 x 384 tokens is launch-bound, 2 x 2048 is not (graphed_step.LAUNCH_BOUND_BELOW).
    assert graphable(runner(), grad_accum=1, dropout=0.0, step_tokens=4 * 384, hidden=3584) is None
    why = graphable(runner(), grad_accum=1, dropout=0.0, step_tokens=2 * 2048, hidden=3584)
    assert why is not None and "4096 tokens at hidden size 3584" in why
    assert graphable(runner(), grad_accum=1, dropout=0.0, step_tokens=2 * 2048, hidden=896) is None  # a 0.5B


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


def test_full_width_rows_hand_the_layers_ready_made_causal_masks(tiny_model_dir, monkeypatch):
    """A capture must see the same layer inputs as the eager steps before it, but transformers builds an explicit
    mask or none depending on whether a CUDA graph is being captured (a compiled layer then recompiles inside the
    capture, which fails). Full-width rows therefore pass each layer its mask ready-made, so no mask is built:
    with the builder made to fail, the loss is still the one of the model's own causal forward."""
    import transformers.models.qwen2.modeling_qwen2 as qwen2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows = synthetic_rows(model.config.vocab_size, 2, 70, seed=2)
    batch = collate(rows, [[0], [1]], [0, 1], 0, True)
    assert batch.plain_causal
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids).logits.float()
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     batch.labels[:, 1:].reshape(-1), reduction="sum")

        def no_masks(*args, **kwargs):
            raise AssertionError("a full-width batch built a mask")

        monkeypatch.setattr(qwen2, "create_causal_mask", no_masks)
        assert float(token_loss_sum(model, batch)) == pytest.approx(float(expected), rel=1e-5)
