"""The K-quant encoder (engine/export/kquants.py) against ggml's own quantizer, called in the libggml-base that
node-llama-cpp ships (`ggml_quantize_chunk`, which without an importance matrix runs quantize_row_q*_K_ref)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from qwenbook_bridge.engine.export.kquants import BLOCK_BYTES, quantize_k
from qwenbook_bridge.engine.llama_cpp.library import find_library_folder

GGML_TYPES = {"q4_k": 12, "q5_k": 13, "q6_k": 14}  # enum ggml_type


@pytest.fixture(scope="module")
def ggml_quantize():
    found = sorted(find_library_folder().glob("libggml-base.so*"))
    assert found, "node-llama-cpp's libggml-base is needed to compare with ggml's quantizer"
    fn = ctypes.CDLL(str(found[0])).ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]

    def run(x: np.ndarray, kind: str) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        out = np.zeros((x.shape[0], x.shape[1] // 256 * BLOCK_BYTES[kind]), np.uint8)
        written = fn(GGML_TYPES[kind], x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        assert written == out.size
        return out
    return run


def samples() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    # Weight-like: small values with rare large outliers, which set the block scales.
    outliers = 1 + 8 * (rng.random((64, 1024)) < 0.005)
    return {"normal": rng.standard_normal((64, 1024)).astype(np.float32),
            "weights": (0.02 * rng.standard_normal((64, 1024)) * outliers).astype(np.float32),
            "positive": rng.random((64, 1024)).astype(np.float32),
            "zeros": np.zeros((2, 512), np.float32)}


def rel_rmse(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(((x - y) ** 2).mean() / max((x ** 2).mean(), 1e-30)))


@pytest.mark.parametrize("kind", list(GGML_TYPES))
def test_k_quant_bytes_are_ggmls(ggml_quantize, kind: str) -> None:
    """Same block layout and, block for block, almost always the same bytes: only where two of the search's grid
    candidates have errors equal to float rounding (summation order) may the choice differ (measured: 83-100% of
    super-blocks identical). The error of what gguf-py dequantizes equals ggml's to 0.2%."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    for name, x in samples().items():
        ours, theirs = quantize_k(x, kind), ggml_quantize(x, kind)
        assert ours.shape == theirs.shape and ours.dtype == np.uint8
        blocks = ours.reshape(-1, BLOCK_BYTES[kind]), theirs.reshape(-1, BLOCK_BYTES[kind])
        same = (blocks[0] == blocks[1]).all(axis=1).mean()
        assert same >= 0.8, f"{kind} {name}: {same:.1%} of super-blocks as ggml writes them"
        back, ref = gguf.quants.dequantize(ours, qtype), gguf.quants.dequantize(theirs, qtype)
        # Where the bytes agree the values do: the layout is read back as ggml wrote it.
        rows_same = (ours == theirs).all(axis=1)
        assert np.array_equal(back[rows_same], ref[rows_same])
        if name == "zeros":
            assert not back.any() and (ours == theirs).all()
        else:
            assert rel_rmse(x, back) <= rel_rmse(x, ref) * 1.002 + 1e-7, name


def test_more_bits_less_error_in_llama_cpps_ranges() -> None:
    """Relative RMSE on Gaussian values (ggml's own quantizer gets 7.1%, 3.6%, 1.8%)."""
    import gguf

    x = samples()["normal"]
    err = {k: rel_rmse(x, gguf.quants.dequantize(quantize_k(x, k), getattr(gguf.GGMLQuantizationType, k.upper())))
           for k in GGML_TYPES}
    assert 0.06 < err["q4_k"] < 0.08 and 0.03 < err["q5_k"] < 0.04 and 0.015 < err["q6_k"] < 0.02, err


def test_shapes_and_refusals() -> None:
    x = np.random.default_rng(1).standard_normal((3, 2, 512)).astype(np.float32)  # a stacked-experts tensor
    assert quantize_k(x, "q6_k").shape == (3, 2, 2 * 210)
    with pytest.raises(ValueError, match="multiple of 256 values; this tensor's rows have 384"):
        quantize_k(np.zeros((2, 384), np.float32), "q4_k")
    with pytest.raises(ValueError, match="unknown K-quant type 'q3_k'"):
        quantize_k(x, "q3_k")
