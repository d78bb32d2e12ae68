"""A training step replayed from a CUDA graph (engine/train/graphed_step.py) does what the eager step does: same
losses, gradient norms, learning rates and adapter weights, step after step, on full-width rows whose prompts
differ in length (so the target count changes and is padded) under a decaying learning rate."""

from __future__ import annotations

import pytest
import torch

from qwenbook_bridge.bench.train_data import synthetic_rows
from qwenbook_bridge.engine.train.batches import collate
from qwenbook_bridge.engine.train.config import LoraSettings, TrainConfig
from qwenbook_bridge.engine.train.graphed_step import GraphedStep, graphable
from qwenbook_bridge.engine.train.step import StepRunner, build_optimizer
from qwenbook_bridge.engine.train.trainable import Trainable

STEPS = 8


def run(graphs: bool, checkpointing: bool, compiled: bool = False, break_capture: bool = False) -> dict[str, list]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=2048, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2)).to(device)
    cfg = TrainConfig(output_dir="-", lora=LoraSettings(r=8, alpha=16, dropout=0.0), max_length=96, batch_size=2,
                      lr=1e-3, packing=True, gradient_checkpointing=checkpointing, seed=3,
                      compile=compiled)
    rows = synthetic_rows(model.config.vocab_size, 2 * STEPS, cfg.max_length, seed=5)
    batches = [collate(rows, [[k] for k in range(len(rows))], [2 * i, 2 * i + 1], 0, True).to(device)
               for i in range(STEPS)]
    assert all(b.plain_causal for b in batches)
    torch.manual_seed(cfg.seed)
    trainable = Trainable(model, cfg, tokenizer=None)
    trainable.prepare()
    optimizer = build_optimizer(trainable.parameters(), cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / (2 * STEPS))
    runner = StepRunner(trainable, optimizer, device=device, max_grad_norm=1.0, scheduler=scheduler)
    if break_capture:
        inner = runner.loss_and_metrics

        def reads_the_loss_while_capturing(batch):
            loss, sums = inner(batch)
            if torch.cuda.is_current_stream_capturing():
                float(loss)  # a host read, which a capture refuses
            return loss, sums

        runner.loss_and_metrics = reads_the_loss_while_capturing
    step = runner if not graphs else GraphedStep(runner, warmup=2)
    assert graphable(runner, grad_accum=1, dropout=0.0) is None
    out: dict[str, list] = {"loss": [], "norm": [], "lr": [], "targets": []}
    for b in batches:
        stats = step([b]) if not graphs else step(b)
        out["loss"].append(float(stats.loss))
        out["norm"].append(float(stats.grad_norm))
        out["lr"].append(float(optimizer.param_groups[0]["lr"]))
        out["targets"].append(b.targets)
    out["weights"] = [p.detach().clone() for p in trainable.parameters()]
    if graphs:
        out["graphs"] = [len(step.graphs)]
        out["failed"] = [step.failed]
    return out


@pytest.mark.parametrize("checkpointing,compiled", [(False, False), (True, False), (True, True)],
                         ids=["plain", "checkpointing", "compiled-checkpointing"])
def test_graphed_steps_equal_eager_steps(checkpointing, compiled):
    # train() graphs a run's steps only when it is compiled, so the compiled layers under checkpointing are the
    # combination users get.
    eager = run(False, checkpointing, compiled)
    graphed = run(True, checkpointing, compiled)
    assert len(set(eager["targets"])) > 1, "the batches must differ in answer length to test padded targets"
    assert graphed["failed"] == [None] and graphed["graphs"][0] >= 1
    assert graphed["lr"] == pytest.approx(eager["lr"], rel=1e-6)
    assert graphed["loss"] == pytest.approx(eager["loss"], rel=1e-5)
    assert graphed["norm"] == pytest.approx(eager["norm"], rel=1e-4)
    for a, b in zip(eager["weights"], graphed["weights"]):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max() + 1e-7


def test_a_capture_that_fails_leaves_eager_steps_that_equal_eager_steps():
    """A step the capture refuses (here: a host read of the loss) leaves the run eager, with a warning, on the
    caller's stream: the steps after it, compiled layers under checkpointing, match a run that never tried."""
    eager = run(False, True, True)
    tried = run(True, True, True, break_capture=True)
    assert tried["graphs"] == [0] and "capture" in (tried["failed"][0] or "")
    assert tried["loss"] == pytest.approx(eager["loss"], rel=1e-5)
    assert tried["norm"] == pytest.approx(eager["norm"], rel=1e-4)
    for a, b in zip(eager["weights"], tried["weights"]):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max() + 1e-7
