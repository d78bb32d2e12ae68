"""CUDA-only checks of the paged engine's decode step (one CUDA graph per batch bucket, the Triton paged-attention
kernel, stacked per-row LoRA, torch.compile), run on the GPU machine (not part of `npm test`, which has no GPU):

    cd python-bridge && PYTHONPATH=. QWENBOOK_TINY_MODEL=<tiny model dir> python -m pytest tests_gpu -q
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from qwenbook_bridge.engine.generate.paged.runner import PagedRunner
from test_fast_decode import _hf_greedy, _prompts, perturbed_lm, tiny_lm  # noqa: F401
from test_paged_runner import NEW_TOKENS, Seq, _peft_greedy, _save_adapter, contiguous_tables, drive

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA device; on CPU run tests/ instead")


@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled"])
def test_graph_decode_steps_equal_transformers_and_peft(perturbed_lm: Any, tmp_path: Path, compile: bool) -> None:
    model = copy.deepcopy(perturbed_lm).cuda()
    first = _save_adapter(model, tmp_path / "attn", seed=11, r=4, lora_alpha=8,
                          target_modules=["q_proj", "v_proj", "o_proj"])
    second = _save_adapter(model, tmp_path / "mlp", seed=12, r=8, lora_alpha=4,
                           target_modules=["k_proj", "gate_proj", "up_proj", "down_proj"])
    prompts = _prompts(model.config.vocab_size, (6, 11, 8, 5, 13), seed=8)
    runner = PagedRunner(model, num_blocks=64, block_size=4, max_batch=8, max_adapters=2, max_rank=8,
                         compile=compile)
    assert runner.decode.use_graphs
    tables = contiguous_tables([len(p) + NEW_TOKENS for p in prompts], 4)
    base = [Seq(p, NEW_TOKENS, t) for p, t in zip(prompts, tables)]
    drive(runner, base, chunk=4)
    assert [s.out for s in base] == [_hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    assert runner.decode._graphs  # the decode-only steps replayed captured graphs
    runner.load_adapter(0, first)
    runner.load_adapter(1, second)
    seqs = [Seq(prompts[0], NEW_TOKENS, tables[0], adapter=0), Seq(prompts[1], NEW_TOKENS, tables[1], adapter=1),
            Seq(prompts[2], NEW_TOKENS, tables[2])]
    drive(runner, seqs, chunk=4)
    assert [s.out for s in seqs] == [_peft_greedy(model, first, prompts[0]), _peft_greedy(model, second, prompts[1]),
                                     _hf_greedy(model, prompts[2], NEW_TOKENS)]
    assert any(lora for _, lora in runner.decode._graphs)  # steps with adapter rows ran their own graphs


@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled"])
def test_qwen3_graph_decode_steps_equal_transformers(tiny_qwen3_dir: Path, compile: bool) -> None:
    """Qwen3's q/k norms and its head_dim apart from hidden_size / heads, through the captured (and compiled)
    decode step, token for token with transformers' greedy decoding."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.float32).cuda().eval()
    prompts = _prompts(model.config.vocab_size, (6, 11, 8, 5), seed=3)
    runner = PagedRunner(model, num_blocks=64, block_size=4, max_batch=8, compile=compile)
    assert runner.decode.use_graphs
    tables = contiguous_tables([len(p) + NEW_TOKENS for p in prompts], 4)
    seqs = [Seq(p, NEW_TOKENS, t) for p, t in zip(prompts, tables)]
    drive(runner, seqs, chunk=4)
    assert [s.out for s in seqs] == [_hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    assert runner.decode._graphs
