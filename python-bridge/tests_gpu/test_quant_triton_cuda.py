"""CUDA-only: the int8/int4 Triton decode kernels against dequantize-then-matmul on the 7B projection shapes,
and the fast decoder on them giving transformers' greedy tokens for the same quantized model."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from qwenbook_bridge.engine.quant import triton_ops as quant_triton
from qwenbook_bridge.engine.generate.fast_decode import FastDecoder
from qwenbook_bridge.engine.quant.config import QuantConfig
from qwenbook_bridge.engine.quant.quantize import quantize_model
from qwenbook_bridge.engine.quant.codes import dequantize_int4, quantize_int4, quantize_int8
from test_fast_decode import _hf_greedy, _prompts, perturbed_lm, tiny_lm  # noqa: F401

SHAPES = [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944), (200, 640)]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_kernels_match_the_reference_on_cuda(n: int, k: int, rows: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    x = torch.randn(rows, k, device="cuda", generator=gen).bfloat16()
    q8, s8 = quantize_int8(w, torch.bfloat16)
    p4, s4 = quantize_int4(w, 128, torch.bfloat16)
    for got, weight in ((quant_triton.int8_matmul(x, q8, s8), q8.float() * s8.float()[:, None]),
                        (quant_triton.int4_matmul(x, p4, s4, 128), dequantize_int4(p4, s4, torch.float32))):
        ref = x.float() @ weight.t()
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        assert (got.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("outlier", [1.0, 1e4])
def test_one_int4_row_in_packed_halves_survives_outlier_activations(dtype: torch.dtype, outlier: float) -> None:
    # One row of 16-bit activations runs in f16x2 (gemv_int4_halves). An activation of 1e4 times a code of -8 is
    # past the half maximum (and still a half itself, so the fp16 case can hold it); the kernel scales such slices by a power of two, so the result stays finite and exact
    # to rounding. The down projection's long rows also go through split K.
    gen = torch.Generator(device="cuda").manual_seed(7)
    for n, k in ((3584, 18944), (512, 3584)):
        w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
        x = torch.randn(1, k, device="cuda", generator=gen)
        x[0, ::97] *= outlier
        x = x.to(dtype)
        p4, s4 = quantize_int4(w, 128, torch.bfloat16)
        got = quant_triton.int4_matmul(x, p4, s4, 128)
        ref = x.float() @ dequantize_int4(p4, s4, torch.float32).t()
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert (got.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_graph_decoder_on_the_kernels_gives_the_models_greedy_tokens(perturbed_lm: Any, method: str) -> None:
    model = copy.deepcopy(perturbed_lm).cuda()
    quantize_model(model, QuantConfig(method=method, group_size=32))
    prompts = _prompts(model.config.vocab_size, (7, 40), seed=3)
    decoder = FastDecoder(model, max_seq_len=160)
    assert decoder.use_graphs
    for prompt in prompts:
        assert decoder.generate([prompt], 48)[0] == _hf_greedy(model, prompt, 48)
