"""CUDA-only: chat requests decode on the fast decoder by default on a GPU, with the plain loop's tokens.

    cd python-bridge && PYTHONPATH=. QWENBOOK_TINY_MODEL=<tiny model dir> python -m pytest tests_gpu -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwenbook_bridge.engine import LoadOptions, SamplingParams, load_model
from qwenbook_bridge.engine.generate.generation import generate
from qwenbook_bridge.engine.generate.decoders import forget
from test_fast_generation import plain_then_fast

CHAT = [{"role": "user", "content": "Count to five."}]

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA device; on CPU run tests/ instead")


def test_gpu_chat_uses_the_fast_decoder_with_the_plain_loops_tokens(tiny_model_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_model(str(tiny_model_dir), LoadOptions(dtype="fp32", device="cuda"))
    greedy = SamplingParams(max_tokens=48, greedy=True)
    plain, fast = plain_then_fast(loaded, CHAT, greedy, monkeypatch, fast_mode="auto")
    assert fast.token_ids == plain.token_ids and fast.text == plain.text
    again = generate(loaded, CHAT, greedy)  # replays the captured graphs
    assert again.token_ids == plain.token_ids
    forget(loaded.model)
