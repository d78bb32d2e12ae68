"""CUDA-only: Qwen3 and Qwen3-MoE on a GPU. Qwen3 chats decode on the fast decoder (CUDA graphs) and on the paged
chat engine (graphs, compiled layers) with transformers' greedy tokens; Qwen3-MoE chats on the plain loop with
transformers' tokens and trains LoRA on attention and experts.

    cd python-bridge && PYTHONPATH=. python -m pytest tests_gpu -q -k qwen3
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from qwenbook_bridge.engine import LoadOptions, SamplingParams, load_model
from qwenbook_bridge.engine.data.datasets import DatasetSpec
from qwenbook_bridge.engine.generate.decoders import _decoders, forget
from qwenbook_bridge.engine.generate.fast_decode import FastDecoder
from qwenbook_bridge.engine.generate.generation import generate, prompt_ids
from qwenbook_bridge.engine.generate.paged.scheduler import EngineConfig, PagedEngine
from qwenbook_bridge.engine.train.config import LoraSettings, TrainConfig
from qwenbook_bridge.engine.train.loop import train

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA device; on CPU run tests/ instead")

CHAT = [{"role": "user", "content": "Tell me about the moon."}]
TOKENS = 32


def hf_greedy(loaded, n: int = TOKENS) -> list[int]:
    ids = torch.tensor([prompt_ids(loaded, CHAT)], device=loaded.device)
    with torch.inference_mode():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_qwen3_on_the_fast_decoder_and_the_chat_engine_equals_transformers(tiny_qwen3_dir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("QWENBOOK_FAST_DECODE", "auto")
    loaded = load_model(str(tiny_qwen3_dir), LoadOptions(dtype="fp32", device="cuda"))
    expected = hf_greedy(loaded)
    forget(loaded.model)
    fast = generate(loaded, CHAT, SamplingParams(max_tokens=TOKENS, greedy=True))
    assert isinstance(_decoders.get(loaded.model), FastDecoder)
    assert fast.token_ids == expected
    forget(loaded.model)
    engine = PagedEngine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=4, num_blocks=64),
                         loaded.eos_token_ids)
    engine.start()
    try:
        on_engine = generate(loaded, CHAT, SamplingParams(max_tokens=TOKENS, greedy=True), engine=engine)
    finally:
        engine.stop()
    assert on_engine.token_ids == expected


def test_qwen3_moe_chats_and_trains_lora_on_attention_and_experts(tiny_qwen3_moe_dir: Path, tmp_path: Path):
    loaded = load_model(str(tiny_qwen3_moe_dir), LoadOptions(dtype="fp32", device="cuda"))
    reply = generate(loaded, CHAT, SamplingParams(max_tokens=TOKENS, greedy=True))
    assert reply.token_ids == hf_greedy(loaded)
    rows = [{"instruction": f"问题{i}", "output": f"回答{i}号"} for i in range(8)]
    losses: list[float] = []
    result = train(loaded.model, loaded.tokenizer, [DatasetSpec(rows)],
                   TrainConfig(output_dir=str(tmp_path / "moe"), max_length=64, batch_size=4, grad_accum=1,
                               max_steps=12, lr=1e-2, lora=LoraSettings(r=4)),
                   on_event=lambda kind, c: losses.append(c["loss"]) if kind == "train_progress" else None,
                   cancel=threading.Event())
    assert result.status == "completed" and losses[-1] < losses[0]
    saved = (Path(result.adapter_path) / "adapter_config.json").read_text()
    assert "experts.gate_up_proj" in saved
