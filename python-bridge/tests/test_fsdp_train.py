"""Sharded training (FSDP2) under torchrun on CPUs (gloo): the same run as one process, and its checkpoints.

Tolerance: per-step losses of the 2-rank run match the 1-process run with the same global batch within 1e-4
(fp32); they differ only in the order gradients are summed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwenbook_bridge.distributed.torchrun import launch
from qwenbook_bridge.engine.train import checkpoints as ckpt
from qwenbook_bridge.engine.data.datasets import DatasetSpec
from qwenbook_bridge.engine.train.loop import train
from qwenbook_bridge.engine.train.config import TrainConfig

# Five rows, one per micro-batch and two micro-batches a step: the third step has one, so rank 1 runs a filler.
ROWS = [{"instruction": f"问题{i}", "output": f"回答{i}号，" * (1 + i % 3)} for i in range(5)]
TOLERANCE = 1e-4


def settings(out: Path, **extra) -> dict:
    base = dict(output_dir=str(out), method="full", max_length=48, batch_size=1, grad_accum=1, epochs=1, lr=1e-3,
                log_every=1, seed=7, warmup=0.0)
    base.update(extra)
    return base


def losses(history: list[dict]) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in history if h["kind"] == "train_progress"}


def one_process(model_dir: Path, data: Path, config: dict) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return train(model, tok, [DatasetSpec(str(data))], TrainConfig.from_dict(config)).to_dict()


def test_fsdp_full_fine_tuning_matches_one_process_and_resumes_there(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    run = {"model": str(tiny_model_dir), "dtype": "fp32", "strategy": "fsdp", "datasets": [{"path": str(data)}],
           "train": settings(tmp_path / "fsdp", save_every=2)}
    seen: list[tuple[str, dict]] = []
    result = launch(run, 2, tmp_path / "launch", on_event=lambda kind, content: seen.append((kind, content)))
    assert result["status"] == "completed" and result["total_steps"] == 3
    assert next(c for k, c in seen if k == "train_begin")["world_size"] == 2

    reference = one_process(tiny_model_dir, data, settings(tmp_path / "one", grad_accum=2))
    sharded, expected = losses(result["history"]), losses(reference["history"])
    assert list(sharded) == list(expected) == [1, 2, 3]
    assert max(abs(sharded[s] - expected[s]) for s in expected) < TOLERANCE, (sharded, expected)

    # The published weights are whole (gathered from both ranks) and equal the one-process run's.
    from safetensors.torch import load_file

    ours = load_file(tmp_path / "fsdp" / "model.safetensors")
    theirs = load_file(tmp_path / "one" / "model.safetensors")
    assert set(ours) == set(theirs)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) < 1e-3

    # Its step-2 checkpoint (optimizer state by parameter name) carries on in one process like the original.
    middle = tmp_path / "fsdp" / "checkpoint-2"
    assert torch.load(middle / "training_state.pt", weights_only=False)["optimizer"]["keys"] == "names"
    resumed = one_process(tiny_model_dir, data, settings(tmp_path / "fsdp", grad_accum=2, resume_from=str(middle)))
    assert abs(losses(resumed["history"])[3] - expected[3]) < TOLERANCE
    assert ckpt.read_trainer_state(ckpt.list_checkpoints(tmp_path / "fsdp")[-1])["step"] == 3


def test_fsdp_lora_matches_one_process(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS * 2), encoding="utf-8")
    lora = dict(method="lora", lora={"r": 4}, max_steps=3, epochs=None)
    run = {"model": str(tiny_model_dir), "dtype": "fp32", "strategy": "fsdp", "datasets": [{"path": str(data)}],
           "train": settings(tmp_path / "fsdp", **lora)}
    result = launch(run, 2, tmp_path / "launch")
    reference = one_process(tiny_model_dir, data, settings(tmp_path / "one", grad_accum=2, **lora))
    sharded, expected = losses(result["history"]), losses(reference["history"])
    assert list(sharded) == [1, 2, 3]
    assert max(abs(sharded[s] - expected[s]) for s in expected) < TOLERANCE, (sharded, expected)
    assert (tmp_path / "fsdp" / "adapter_model.safetensors").is_file()
