"""FastDecoder over the engine's int8/int4 layers (CPU, fp32): the same greedy tokens as transformers' generate
on the same quantized model, since both run the layers' own packed kernels."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from qwenbook_bridge.engine.generate.fast_decode import FastDecoder
from qwenbook_bridge.engine.quant.config import QuantConfig
from qwenbook_bridge.engine.quant.quantize import quantize_model
from qwenbook_bridge.engine.quant.layers import QuantizedLinear
from test_fast_decode import CHECK_TOKENS, _hf_greedy, _prompts, perturbed_lm, tiny_lm  # noqa: F401


pytestmark = pytest.mark.usefixtures("fused_cpu_kernel")  # the kernel under test here


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_layers_decode_as_their_model_does(perturbed_lm: Any, method: str) -> None:
    model = copy.deepcopy(perturbed_lm)
    quantize_model(model, QuantConfig(method=method, group_size=32))
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    decoder = FastDecoder(model, max_seq_len=160, batch_size=2)
    prompts = _prompts(model.config.vocab_size, (7, 40), seed=3)
    got = decoder.generate(prompts, CHECK_TOKENS)
    assert got == [_hf_greedy(model, p, CHECK_TOKENS) for p in prompts]


def test_compiling_quantized_layers_is_refused_with_what_to_use(perturbed_lm: Any) -> None:
    model = copy.deepcopy(perturbed_lm)
    quantize_model(model, QuantConfig(method="int8"))
    with pytest.raises(ValueError, match="compile=True takes int8/int4 layers only where their Triton kernels run"):
        FastDecoder(model, max_seq_len=64, compile=True)
