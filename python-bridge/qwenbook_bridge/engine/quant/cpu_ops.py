"""int8/int4 weight-only matmuls on the CPU.

PyTorch's packed CPU operators (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) ran 4-10 times slower
than an fp32 `F.linear` of the same shape on the 2-core AMD EPYC this was measured on (torch reports AVX512
there), and a 39-token prefill of a 0.5B-shaped model took 6 s (int8) and 14 s (int4) instead of the 0.5 s of
fp32. So the CPU takes two other paths:

- many rows (a prefill chunk): the weight is dequantized once into a scratch buffer that every layer of the
  thread reuses (no allocation per call), then one dense matmul;
- a few rows (decoding): a fused kernel that reads the codes, converts them in registers and sums in fp32 over
  slices of 128 inputs (one long reduction per output ran at half the speed for the 4864-input down
  projection), compiled once by Inductor (`torch.compile`, cached on disk), so a step reads 1 byte (int8) or
  half a byte (int4) per weight instead of 4. Where it cannot be compiled (no C++ compiler) or disagrees with
  dequantize-then-matmul, the dense path serves every call.

int4 codes are kept on the CPU in a "halves" layout: byte i of a group holds input i (low nibble) and input
i + group/2 (high nibble), so that both nibbles meet contiguous slices of the input (the canonical layout pairs
even with odd inputs, which the compiled kernel read at a fifth of the speed). `from_halves` gives the
canonical codes back exactly.

Dequantizing is bit-identical to codes.py's (the integer code times its scale, one rounding), so the dense path
computes what `x @ dequantize(...)^T` computes; the fused kernel sums in another order.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qwenbook_bridge.engine.quant.codes import pack_int4, unpack_int4

log = logging.getLogger(__name__)

# Up to this many rows the fused kernel runs; beyond, dequantize + dense matmul. Measured on the 0.5B shape's
# projections, one thread: the fused int8 kernel took 0.1-0.8 ms a row against fp32 F.linear's 0.1-1.8 ms,
# while at 39 rows dequantize + matmul wins by far.
FUSED_MAX_ROWS = 4
SLICE = 128  # inputs per partial sum of the fused int8 kernel

_local = threading.local()
_compile_lock = threading.Lock()
_fused: dict[str, Callable[..., torch.Tensor] | None] = {}


def to_halves(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """Canonical int4 codes [N, K/2] -> the CPU's halves layout (same size)."""
    n = packed.shape[0]
    codes = unpack_int4(packed).view(n, -1, group_size)
    half = group_size // 2
    return (codes[..., :half] | (codes[..., half:] << 4)).reshape(n, -1).contiguous()


def from_halves(halves: torch.Tensor, group_size: int) -> torch.Tensor:
    n = halves.shape[0]
    h = halves.view(n, -1, group_size // 2)
    return pack_int4(torch.cat((h & 15, h >> 4), dim=-1).reshape(n, -1))


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's reusable buffer of `numel` elements of `dtype` (grown when needed, never shrunk)."""
    bufs: dict[torch.dtype, torch.Tensor] | None = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        # A normal tensor even when first asked for under inference mode: an inference tensor could not be
        # written outside it (transformers' generate runs under no_grad, the engine under inference_mode).
        with torch.inference_mode(False):
            buf = bufs[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def dequantize_into(method: str, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] or int4 halves [N, K/2] -> code * scale in `out` [N, K]. A cast copy then an in-place
    multiply: both vectorized, three times faster than one multiply that promotes the integer codes."""
    if method == "int8":
        return out.copy_(codes).mul_(scales.to(out.dtype)[:, None])
    n, groups = scales.shape
    h = codes.view(n, groups, -1)
    signed = torch.stack(((h & 15).view(torch.int8), (h >> 4).view(torch.int8)), dim=-2).view(n, groups, -1)
    w = out.view(n, groups, -1)
    w.copy_(signed).sub_(8).mul_(scales.to(out.dtype)[..., None])  # code - 8 is exact: one rounding, as codes.py
    return out


def dense_matmul(x: torch.Tensor, method: str, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W^T with W dequantized into this thread's scratch buffer."""
    n = codes.shape[0]
    k = codes.shape[1] * (2 if method == "int4" else 1)
    return F.linear(x, dequantize_into(method, codes, scales, _scratch(n * k, x.dtype).view(n, k)))


def _int8_rows(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    n = codes.shape[0]
    if k % SLICE:
        return (x[:, None, :] * codes[None].to(x.dtype)).sum(-1) * scales.to(x.dtype)
    parts = (x.view(m, 1, -1, SLICE) * codes.view(1, n, -1, SLICE).to(x.dtype)).sum(-1)
    return parts.sum(-1) * scales.to(x.dtype)


def _int4_rows(x: torch.Tensor, halves: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    m = x.shape[0]
    n, groups = scales.shape
    h = halves.shape[1] // groups
    lo = ((halves & 15).to(x.dtype) - 8).view(1, n, groups, h)
    hi = ((halves >> 4).to(x.dtype) - 8).view(1, n, groups, h)
    x4 = x.view(m, 1, groups, 2, h)
    return ((x4[:, :, :, 0] * lo + x4[:, :, :, 1] * hi).sum(-1) * scales.to(x.dtype)[None]).sum(-1)


def _enabled() -> bool:
    return os.environ.get("QWENBOOK_CPU_QUANT_KERNEL", "1").strip() != "0"


def fused_kernel(method: str) -> Callable[..., torch.Tensor] | None:
    """The compiled few-row kernel for `method` (int8 codes or int4 halves), checked once against
    dequantize-then-matmul; None where it cannot be built here or `QWENBOOK_CPU_QUANT_KERNEL=0` (then the dense
    path serves every call)."""
    if not _enabled():
        return None
    if method not in _fused:
        with _compile_lock:
            if method not in _fused:
                _fused[method] = _build(method)
    return _fused[method]


def _uniform_calls(compiled: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`compiled`, always called in the same autograd state with a fresh contiguous x. Its guards check the
    dispatch keys and the view base of x, so callers under no_grad (transformers' generate) and under
    inference_mode (the engine), or a view as x, each cost a compilation of their own: seconds of every
    process that decodes on the CPU. x is a few rows, so the copy is nothing beside reading the weight."""
    def call(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # no caller does; a graph for it would be a third kind
            return compiled(x, codes, scales)
        with torch.inference_mode(False), torch.no_grad():
            return compiled(x.clone(), codes, scales)

    return call


def _build(method: str) -> Callable[..., torch.Tensor] | None:
    from qwenbook_bridge.engine.quant.codes import dequantize_int4, quantize_int4, quantize_int8

    fn = _uniform_calls(torch.compile(_int8_rows if method == "int8" else _int4_rows, dynamic=True))
    g = torch.Generator().manual_seed(0)
    try:
        w = torch.randn(48, 512, generator=g)
        if method == "int8":
            codes, scales = quantize_int8(w, torch.float32)
            ref_w = codes.float() * scales[:, None]
        else:
            packed, scales = quantize_int4(w, 128, torch.float32)
            ref_w = dequantize_int4(packed, scales, torch.float32)
            codes = to_halves(packed, 128)
        for rows in (1, 3):  # one row and several are separate compilations
            x = torch.randn(rows, 512, generator=g)
            with torch.inference_mode():
                got = fn(x, codes, scales)
            ref = x @ ref_w.t()
            if not bool(((got - ref).abs().max() <= 1e-4 * ref.abs().max()).item()):
                log.warning("the compiled CPU %s kernel disagrees with dequantize+matmul; not using it", method)
                return None
    except Exception as e:  # noqa: BLE001 - no C++ compiler, an Inductor failure: the dense path serves, say why
        log.info("compiled CPU %s kernel unavailable (%s); decoding dequantizes into a buffer instead", method, e)
        return None
    return fn
