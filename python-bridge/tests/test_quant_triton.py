"""The int8/int4 Triton decode kernels, run on the CPU through Triton's interpreter (TRITON_INTERPRET=1).

On a GPU the same kernels compile to CUDA; tests_gpu/test_quant_triton_cuda.py checks them there. The
interpreter cannot multiply bfloat16 tiles in tl.dot, so the several-row kernels are checked in float16 here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from qwenbook_bridge.engine.quant import layers as quant_layers, triton_ops as quant_triton
from qwenbook_bridge.engine.generate.fast_decode import FastDecoder
from qwenbook_bridge.engine.quant.config import QuantConfig
from qwenbook_bridge.engine.quant.quantize import quantize_model
from qwenbook_bridge.engine.quant.layers import Int4Linear, Int8Linear
from qwenbook_bridge.engine.quant.codes import dequantize_int4, quantize_int4, quantize_int8
from test_fast_decode import _hf_greedy, _prompts, perturbed_lm, tiny_lm  # noqa: F401


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    saved = dict(quant_layers._KERNEL_CHECKED)  # checks made under the interpreter stay with these tests
    yield
    quant_layers._KERNEL_CHECKED.clear()
    quant_layers._KERNEL_CHECKED.update(saved)


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    return bool(((got.float() - ref).abs().max() <= tol * ref.abs().max()).item())


CASES = [  # rows, dtype, tolerance relative to the largest output
    (1, torch.float32, 1e-5), (1, torch.bfloat16, 1e-2), (3, torch.float16, 2e-3), (16, torch.float16, 2e-3),
    (32, torch.float16, 2e-3)]  # 16 and 32 rows: pick_config's wide tiles (int8 from 16 rows, int4 from 32)
CONFIGS = [None, quant_triton.KernelConfig(block_n=16, block_k=128, split_k=3),
           quant_triton.KernelConfig(block_n=32, block_k=256, split_k=2, num_warps=2),
           quant_triton.KernelConfig(block_n=8, block_k=256, split_k=2, words=True)]


@pytest.mark.parametrize("rows,dtype,tol", CASES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_int8_kernels_match_dequantize_then_matmul(interpret: None, rows: int, dtype: torch.dtype, tol: float,
                                                   cfg: quant_triton.KernelConfig | None) -> None:
    # 72 output rows and 640 inputs: neither a multiple of the tiles, so the masks are exercised.
    codes, scales = quantize_int8(_weights(72, 640), torch.bfloat16)
    x = torch.randn(rows, 640, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = x.float() @ (codes.float() * scales.float()[:, None]).t()
    got = quant_triton.int8_matmul(x, codes, scales, cfg)
    assert got.shape == (rows, 72) and got.dtype == dtype
    assert _close(got, ref, tol)


@pytest.mark.parametrize("rows,dtype,tol", CASES)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_kernels_match_dequantize_then_matmul(interpret: None, rows: int, dtype: torch.dtype, tol: float,
                                                   group: int) -> None:
    packed, scales = quantize_int4(_weights(40, 640), group, torch.bfloat16)
    x = torch.randn(rows, 640, generator=torch.Generator().manual_seed(2)).to(dtype)
    ref = x.float() @ dequantize_int4(packed, scales, torch.float32).t()
    for cfg in (None, quant_triton.KernelConfig(block_n=16, block_k=max(group, 128), split_k=3),
                quant_triton.KernelConfig(block_n=8, block_k=max(group, 256), split_k=2, words=True)):
        got = quant_triton.int4_matmul(x, packed, scales, group, cfg)
        assert got.shape == (rows, 40) and got.dtype == dtype
        assert _close(got, ref, tol), (cfg, (got.float() - ref).abs().max())


def test_kernels_split_k_into_partial_sums_that_add_up(interpret: None) -> None:
    codes, scales = quantize_int8(_weights(64, 1024), torch.float32)
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(3))
    whole = quant_triton.int8_matmul(x, codes, scales, quant_triton.KernelConfig(16, 128, split_k=1))
    for split in (2, 3, 8):
        parts = quant_triton.int8_matmul(x, codes, scales, quant_triton.KernelConfig(16, 128, split_k=split))
        torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-4)


def test_configs_cover_the_gpu_for_small_layers() -> None:
    # A 512-row projection of a 7B model would give 32 programs at 16 rows each; splitting K fills the SMs.
    small = quant_triton.pick_config("int4", 1, 512, 3584, 128)
    assert -(-512 // small.block_n) * small.split_k >= 128
    assert quant_triton.pick_config("int8", 1, 18944, 3584).split_k == 1
    assert quant_triton.pick_config("int4", 8, 3584, 18944, 128).block_k == 128
    assert quant_triton.pick_config("int8", 1, 3584, 18944).split_k > 1  # the down projection's long rows
    assert quant_triton.pick_config("int4", 8, 512, 3584, 128).split_k > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_pass_dequantize_is_bit_identical_to_torchs(interpret: None, dtype: torch.dtype) -> None:
    w = _weights(72, 384, seed=6)
    codes, scales = quantize_int8(w, torch.bfloat16)
    assert torch.equal(quant_triton.dequantize("int8", codes, scales, dtype), codes.to(dtype) * scales.to(dtype)[:, None])
    for group in (32, 64, 128):
        packed, s4 = quantize_int4(w, group, torch.bfloat16)
        assert torch.equal(quant_triton.dequantize("int4", packed, s4, dtype, group),
                           dequantize_int4(packed, s4, dtype))


def test_layers_dequantize_through_the_kernel_where_it_runs(interpret: None, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = Int4Linear.from_float(_weights(48, 256, seed=7), None, 64, torch.float32)
    calls: list[str] = []
    real = quant_triton.dequantize
    monkeypatch.setattr(quant_triton, "dequantize", lambda m, *a, **k: calls.append(m) or real(m, *a, **k))
    layer.dequantize(torch.float32)  # the first call also checks the kernel against torch
    calls.clear()
    got = layer.dequantize(torch.float32)
    assert calls == ["int4"]
    assert torch.equal(got, dequantize_int4(layer.qweight, layer.scales, torch.float32))


def test_what_the_kernels_take() -> None:
    x = torch.zeros(1, 256)
    assert not quant_triton.available(torch.device("cpu"))  # no interpreter: CPU layers keep their kernels
    assert not quant_triton.supports("int8", x)


def test_supports_rejects_what_the_tiles_cannot_do(interpret: None) -> None:
    assert quant_triton.supports("int4", torch.zeros(1, 256), 64)
    assert not quant_triton.supports("int4", torch.zeros(1, 96 * 2), 48)  # group not a power of two
    assert quant_triton.supports("int8", torch.zeros(32, 256, dtype=torch.float16))  # a batch decoding
    assert not quant_triton.supports("int8", torch.zeros(33, 256, dtype=torch.float16))  # prefill
    assert not quant_triton.supports("int8", torch.zeros(2, 256))  # fp32 in tl.dot would be tf32
    assert not quant_triton.supports("int8", torch.zeros(4, 256, dtype=torch.float16)[:, ::2])


@pytest.mark.parametrize("cls", ["int8", "int4"])
def test_layers_use_the_kernels_for_few_rows_and_dequantize_for_many(interpret: None, cls: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    w = _weights(48, 256, seed=4)
    layer = (Int8Linear.from_float(w, None, torch.float16) if cls == "int8"
             else Int4Linear.from_float(w, None, 64, torch.float16))
    calls: list[int] = []
    name = f"{cls}_matmul"
    real = getattr(quant_triton, name)
    monkeypatch.setattr(quant_triton, name, lambda x, *a, **k: calls.append(x.shape[0]) or real(x, *a, **k))
    ref_w = layer.dequantize(torch.float32)
    with torch.no_grad():
        for rows in (1, 5, 40):  # 40 > MAX_ROWS
            x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).half()
            assert _close(layer(x[None])[0], x.float() @ ref_w.t(), 2e-3)
    assert 1 in calls and 5 in calls and 40 not in calls  # 40 rows go through dequantize + matmul
    assert layer.qweight.dtype == (torch.int8 if cls == "int8" else torch.uint8)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_fast_decoder_on_the_kernels_gives_the_models_greedy_tokens(interpret: None, perturbed_lm: Any,
                                                                     method: str) -> None:
    model = copy.deepcopy(perturbed_lm)
    quantize_model(model, QuantConfig(method=method, group_size=32))
    prompt = _prompts(model.config.vocab_size, (9,), seed=5)[0]
    # The reference is transformers' loop over the same layers with the interpreter off: dequantize+matmul.
    # Three tokens: the prefill's and two decode steps on the kernels; each interpreted kernel call costs ~0.35 s
    # of CPU (a dozen of them a step), so longer replies would only repeat the same step.
    with pytest.MonkeyPatch.context() as off:
        off.delenv("TRITON_INTERPRET")
        reference = _hf_greedy(model, prompt, 3)
    calls: list[int] = []
    real = getattr(quant_triton, f"{method}_matmul")
    with pytest.MonkeyPatch.context() as spy:
        spy.setattr(quant_triton, f"{method}_matmul", lambda x, *a, **k: calls.append(x.shape[0]) or real(x, *a, **k))
        got = FastDecoder(model, max_seq_len=64).generate([prompt], 3)[0]
    assert calls and set(calls) == {1}  # every decode step (the 9-token prefill dequantizes)
    assert got == reference


def test_compiled_decoder_takes_quantized_layers_where_the_kernels_run(interpret: None, perturbed_lm: Any) -> None:
    model = copy.deepcopy(perturbed_lm)
    quantize_model(model, QuantConfig(method="int4", group_size=32))
    prompt = _prompts(model.config.vocab_size, (9,), seed=6)[0]
    with pytest.MonkeyPatch.context() as off:
        off.delenv("TRITON_INTERPRET")
        reference = _hf_greedy(model, prompt, 3)  # the prefill's token and two compiled decode steps
        with pytest.raises(ValueError, match="only where their Triton kernels run"):
            FastDecoder(model, max_seq_len=64, compile=True)
    decoder = FastDecoder(model, max_seq_len=64, compile=True)
    assert decoder.generate([prompt], 3)[0] == reference


def test_a_kernel_that_fails_its_check_is_not_used(interpret: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: Any, **_k: Any) -> torch.Tensor:
        raise RuntimeError("compile failed")  # what a Triton or driver failure looks like from here

    monkeypatch.setattr(quant_triton, "int8_matmul", broken)
    layer = Int8Linear.from_float(_weights(48, 256, seed=8), None, torch.float32)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got = layer(x)  # falls back to dequantize + matmul, and remembers not to try again
    assert quant_layers._KERNEL_CHECKED[("int8-triton", "cpu", torch.float32)] is False
    assert layer.decode_weight(torch.float32) is None  # the fast decoder keeps the layer's own forward
    assert _close(got, x @ layer.dequantize(torch.float32).t(), 1e-5)


def test_the_decoder_gets_no_packed_weights_where_the_dequantize_kernel_fails(interpret: None,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: Any, **_k: Any) -> torch.Tensor:
        raise RuntimeError("compile failed")

    layer = Int4Linear.from_float(_weights(48, 256, seed=9), None, 64, torch.float32)
    monkeypatch.setattr(quant_triton, "dequantize", broken)
    # quant_matmul dequantizes for prefill, so its matmul kernels passing is not enough.
    assert layer.decode_weight(torch.float32) is None
