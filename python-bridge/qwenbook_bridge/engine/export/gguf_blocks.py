"""GGUF block (de)quantization of whole tensors with gguf-py's own per-block math, in large slices of rows.

gguf-py applies its block functions to groups of 16 rows, so a 150k-row embedding costs about ten thousand
Python calls each way; these slices hold about four million values, so that is a few dozen calls and the
bytes are the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_SLICE_VALUES = 1 << 22  # bounds the float32 temporaries at some tens of MB, whatever the tensor


def _traits(qtype: Any) -> Any:
    import gguf

    return getattr(gguf.quants, qtype.name, None)


def _rows_per_slice(row_values: int) -> int:
    return max(1, _SLICE_VALUES // max(1, row_values))


def quantize(arr: np.ndarray, qtype: Any) -> np.ndarray:
    """`arr` (float, any shape) as `qtype` blocks: uint8 of the byte shape gguf-py gives."""
    import gguf

    cls = _traits(qtype)
    if cls is None or arr.ndim == 0 or not cls.can_quantize(arr):
        return gguf.quants.quantize(arr, qtype)  # gguf-py's own error for a row that is no whole block
    rows = arr.reshape(-1, arr.shape[-1])
    step = _rows_per_slice(rows.shape[1])
    out = np.concatenate([cls.quantize_rows(rows[i:i + step]) for i in range(0, rows.shape[0], step)])
    return out.reshape(*arr.shape[:-1], out.shape[-1])


def dequantize(raw: np.ndarray, qtype: Any) -> np.ndarray:
    """uint8 blocks (rows of whole blocks) back to float32."""
    import gguf

    cls = _traits(qtype)
    if cls is None:
        return gguf.quants.dequantize(raw, qtype)
    cls.init_grid()  # the i-quants decode through a grid built once
    rows = raw.reshape(-1, raw.shape[-1])
    step = _rows_per_slice(rows.shape[1] * 8)
    out = np.concatenate([cls.dequantize_rows(rows[i:i + step]) for i in range(0, rows.shape[0], step)])
    return out.reshape(*raw.shape[:-1], out.shape[-1])
