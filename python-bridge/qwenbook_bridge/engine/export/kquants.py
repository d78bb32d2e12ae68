"""Quantizing to llama.cpp's K-quant types Q4_K, Q5_K and Q6_K, which gguf-py can read but not write.

The algorithm is ggml's reference quantizer (no importance matrix: `quantize_row_q{4,5,6}_K_ref`), computed for
all super-blocks of a tensor at once:
- Q4_K / Q5_K: a super-block of 256 values is 8 sub-blocks of 32, each with its own scale and minimum
  (x ~ d * sc * q - dmin * m, q in 0..15 or 0..31). The sub-block's (scale, min) is a weighted least-squares fit
  tried at several grid scales (ggml's `make_qkx2_quants`, weights av|x| + |x|); the 8 scales and the 8 mins are
  then quantized to 6 bits against the super-block's fp16 d and dmin and packed into 12 bytes.
- Q6_K: 16 sub-blocks of 16, symmetric (x ~ d * sc * (q - 32), q in 0..63), each sub-block's scale the best of 19
  grid points under x^2-weighted error (`make_qx_quants`), 8-bit signed sub-block scales and one fp16 d.
The codes are recomputed from the rounded scales, so only a sub-block's (scale, min) comes out of the search.
Byte layouts (per super-block): Q4_K d, dmin, scales[12], qs[128] (144 bytes); Q5_K d, dmin, scales[12], qh[32],
qs[128] (176); Q6_K ql[128], qh[64], scales[16] (int8), d (210).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

QK_K = 256
BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
# ggml's threshold below which a group counts as all zeros.
_GROUP_MAX_EPS = np.float32(1e-15)
# Super-blocks processed at once: bounds the temporary arrays to some tens of megabytes.
_CHUNK = 512


def _f16(v: np.ndarray) -> np.ndarray:
    """fp32 -> fp16 -> fp32, the rounding of the stored d / dmin (round to nearest even, as ggml's conversion)."""
    return v.astype(np.float16).astype(np.float32)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b, dtype=np.float32)


def _scale_min_fit(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants over rows of `x` (sub-blocks): (scale, -min) with x ~ scale * q + min, q in 0..nmax.

    The starting point maps [min(x, 0), max(x)] onto 0..nmax; each of the nstep + 1 grid scales (over the range
    from the best minimum so far) rounds, solves the weighted least squares for (scale, min) (min held <= 0) and
    is kept when its weighted squared error is lower. The error comes from the fit's own sums
    (s^2 sum wq^2 + 2sm sum wq - 2s sum wqx + m^2 sum w - 2m sum wx + sum wx^2, combined in float64) rather than a
    pass over the values: the same number up to rounding, for a third fewer passes."""
    f32, f64 = np.float32, np.float64
    mn = np.minimum(x.min(axis=1), f32(0))
    mx = x.max(axis=1)
    wx = w * x
    sum_w, sum_x, sum_x2 = (v.astype(f64) for v in (w.sum(axis=1, dtype=f32), wx.sum(axis=1, dtype=f32),
                                                   _dot(wx, x)))
    flat = mx == mn
    buf, wq = np.empty_like(x), np.empty_like(x)

    def sums(iscale: np.ndarray, mins: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        np.subtract(x, mins[:, None], out=buf)
        np.multiply(buf, iscale[:, None], out=buf)
        np.rint(buf, out=buf)
        np.clip(buf, 0, nmax, out=buf)
        np.multiply(w, buf, out=wq)
        return wq.sum(axis=1, dtype=f32).astype(f64), _dot(wq, buf).astype(f64), _dot(wq, x).astype(f64)

    def error(scale: np.ndarray, mins: np.ndarray, sl: np.ndarray, sl2: np.ndarray, sxl: np.ndarray) -> np.ndarray:
        s, m = scale.astype(f64), mins.astype(f64)
        return s * s * sl2 + 2 * s * m * sl - 2 * s * sxl + m * m * sum_w - 2 * m * sum_x + sum_x2

    iscale = f32(nmax) / np.where(flat, f32(1), mx - mn)
    scale = f32(1) / iscale
    best = error(scale, mn, *sums(iscale, mn))
    for step in range(nstep + 1):
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / np.where(flat, f32(1), mx - mn)
        sl, sl2, sxl = sums(iscale, mn)
        d = sum_w * sl2 - sl * sl
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = ((sum_w * sxl - sum_x * sl) / d).astype(f32)
            this_min = ((sl2 * sum_x - sl * sxl) / d).astype(f32)
            clamp = this_min > 0
            this_scale = np.where(clamp, (sxl / sl2).astype(f32), this_scale)
        this_min = np.where(clamp, f32(0), this_min)
        err = error(this_scale, this_min, sl, sl2, sxl)
        better = (d > 0) & (err < best)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    return np.where(flat, f32(0), scale).astype(f32), (-mn).astype(f32)


def _qx_scale(x: np.ndarray, nmax: int) -> np.ndarray:
    """ggml's make_qx_quants(rmse_type=1) over rows of `x`: the scale of symmetric codes in -nmax..nmax-1 that
    best fits x under weights x^2, over 19 grid points around nmax / max|x|. 0 for an all-zero row."""
    f32 = np.float32
    w = x * x
    idx = np.abs(x).argmax(axis=1)
    peak = np.take_along_axis(x, idx[:, None], axis=1)[:, 0]
    zero = np.abs(peak) < _GROUP_MAX_EPS
    peak = np.where(zero, f32(1), peak)

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.rint(iscale[:, None] * x)
        np.clip(q, -nmax, nmax - 1, out=q)
        wq = w * q
        return _dot(wq, x), _dot(wq, q)

    slx, sl2 = fit(-f32(nmax) / peak)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(sl2 > 0, slx / sl2, f32(0))
    best = scale * slx
    for step in (*range(-9, 0), *range(1, 10)):
        slx, sl2 = fit(-(f32(nmax) + f32(0.1) * f32(step)) / peak)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(better, slx / sl2, scale)
        best = np.where(better, scale * slx, best)
    return np.where(zero, f32(0), scale).astype(f32)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins in 12 bytes (ggml's get_scale_min_k4 reads them back)."""
    out = np.empty((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _asym_codes(x: np.ndarray, nmax: int, rmin: float, rstep: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The Q4_K / Q5_K encoding of super-blocks `x` [n, 256]: (d, dmin) fp16, 6-bit scales and mins [n, 8],
    codes [n, 256] in 0..nmax."""
    f32 = np.float32
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    av = np.sqrt(_dot(sub, sub) / f32(32))
    scales, mins = _scale_min_fit(sub, av[:, None] + np.abs(sub), nmax, rmin, 0.1, rstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    # ggml starts both maxima at +0 and only raises them, so an all-zero super-block stores +0, never -0.
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    max_scale, max_min = np.where(max_scale > 0, max_scale, f32(0)), np.where(max_min > 0, max_min, f32(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    # ggml stores the rounded value in a uint8 before clamping to 63: a negative one wraps to 63 as well.
    ls = np.minimum(np.rint(inv_scale[:, None] * scales).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(np.rint(inv_min[:, None] * mins).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    d = (max_scale / f32(63)).astype(np.float16)
    dmin = (max_min / f32(63)).astype(np.float16)
    sd = d.astype(f32)[:, None] * ls.astype(f32)
    sm = dmin.astype(f32)[:, None] * lm.astype(f32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((x.reshape(n, 8, 32) + sm[:, :, None]) / sd[:, :, None])
    q = np.where(sd[:, :, None] == 0, f32(0), q)
    q = np.clip(q, 0, nmax).astype(np.uint8).reshape(n, QK_K)
    return d, dmin, _pack_scales_k4(ls, lm), q


def _q4_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    d, dmin, scales, q = _asym_codes(x, 15, -1.0, 20)
    qr = q.reshape(n, 4, 2, 32)  # 64-value chunks: low nibble the first 32, high nibble the next 32
    qs = (qr[:, :, 0] | (qr[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), scales, qs], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    d, dmin, scales, q = _asym_codes(x, 31, -0.5, 15)
    qr = q.reshape(n, 4, 2, 32)
    qs = ((qr[:, :, 0] & 0xF) | ((qr[:, :, 1] & 0xF) << 4)).reshape(n, 128)
    # Fifth bits: bit 2c of qh[j] is value 64c + j's, bit 2c + 1 value 64c + 32 + j's.
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
    qh = ((qr >> 4) << shifts).sum(axis=(1, 2), dtype=np.uint8)
    return np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), scales, qh, qs],
                          axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    f32 = np.float32
    n = x.shape[0]
    scales = _qx_scale(x.reshape(n * 16, 16), 32).reshape(n, 16)
    pick = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, pick[:, None], axis=1)[:, 0]
    zero = np.abs(max_scale) < _GROUP_MAX_EPS
    iscale = np.where(zero, f32(0), f32(-128) / np.where(zero, f32(1), max_scale))
    with np.errstate(divide="ignore"):
        d = np.where(zero, f32(0), f32(1) / np.where(zero, f32(1), iscale)).astype(np.float16)
    sc = np.minimum(np.rint(iscale[:, None] * scales), 127).astype(np.int8)
    sd = d.astype(f32)[:, None] * sc.astype(f32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(x.reshape(n, 16, 16) / sd[:, :, None])
    q = np.where(sd[:, :, None] == 0, f32(0), q)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # halves of 128, quarters of 32
    ql = np.stack([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                   (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(n, 128)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    qh = ((q >> 4) << shifts).sum(axis=2, dtype=np.uint8).reshape(n, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(n, 2)], axis=1)
    out[zero] = 0  # ggml zeroes an all-zero super-block entirely
    return out


_ENCODERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k}


def quantize_k(arr: np.ndarray, kind: str) -> np.ndarray:
    """`arr` (rows of a multiple of 256 values) as `kind` (q4_k, q5_k, q6_k) blocks: uint8, shape
    [..., row / 256 * block bytes], the layout gguf-py's `quants.quantize` gives for the types it can write."""
    if kind not in _ENCODERS:
        raise ValueError(f"unknown K-quant type {kind!r}: use one of {', '.join(_ENCODERS)}")
    if arr.shape[-1] % QK_K:
        raise ValueError(f"a {kind} row must be a multiple of {QK_K} values; this tensor's rows have {arr.shape[-1]}")
    blocks = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], BLOCK_BYTES[kind]), np.uint8)
    encode = _ENCODERS[kind]
    for start in range(0, blocks.shape[0], _CHUNK):
        out[start:start + _CHUNK] = encode(blocks[start:start + _CHUNK])
    return out.reshape(*arr.shape[:-1], arr.shape[-1] // QK_K * BLOCK_BYTES[kind])
