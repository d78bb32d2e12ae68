"""CUDA-only checks of the fast decode path, run on the GPU machine (not part of `npm test`, which has no GPU):

    cd python-bridge && PYTHONPATH=. QWENBOOK_TINY_MODEL=<tiny model dir> python -m pytest tests_gpu -q
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from qwenbook_bridge.engine.generate.fast_decode import FastDecoder
from qwenbook_bridge.engine.generate.sampling import SamplingParams
from test_fast_decode import CHECK_TOKENS, _hf_greedy, _prompts, perturbed_lm, tiny_lm  # noqa: F401

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA device; on CPU run tests/ instead")


@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled"])
def test_cuda_graph_path_matches_eager_and_transformers(perturbed_lm: Any, compile: bool) -> None:
    model = copy.deepcopy(perturbed_lm).cuda()
    prompts = _prompts(model.config.vocab_size, (5, 40, 300))
    eager = FastDecoder(model, max_seq_len=400, batch_size=3, cuda_graphs=False)
    graphed = FastDecoder(model, max_seq_len=400, batch_size=3, compile=compile)
    expected = eager.generate(prompts, CHECK_TOKENS)
    # Twice: the second run replays the graphs captured by the first.
    assert graphed.generate(prompts, CHECK_TOKENS) == expected
    assert graphed.generate(prompts, CHECK_TOKENS) == expected
    assert expected[2] == _hf_greedy(model, prompts[2], CHECK_TOKENS)
    warm = SamplingParams(temperature=1.0, top_k=0, top_p=0.9, seed=5)
    assert graphed.generate(prompts, 32, warm) == graphed.generate(prompts, 32, warm)
