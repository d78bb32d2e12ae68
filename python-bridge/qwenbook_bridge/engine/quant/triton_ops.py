"""Triton kernels for int8/int4 weight-only matmuls with few input rows (decoding).

At batch 1 a decode step is a chain of matrix-vector products, bound by how fast the weights stream from
memory. PyTorch's packed operators do not get there on CUDA: the int8 one was slower than dequantizing and
running a bf16 matmul, and the int4 one (tinygemm) read its weights at about a third of the card's bandwidth.
These kernels read the engine's canonical layouts directly (int8 codes [N, K] with a scale per row; int4 codes
two to a byte, low nibble first, with a scale per group), dequantize in registers and accumulate in fp32:

- `gemv_*`: one input row. Each program owns BLOCK_N output rows and walks K in BLOCK_K slices, summing
  in fp32 on the CUDA cores; K may be split over SPLIT_K programs whose partial sums are added afterwards.
  The int4 kernels (and int8 with `words`) read the codes as 32-bit words. For 16-bit activations the int4
  one works in packed halves, two codes per instruction (gemv_int4_halves); for fp32 activations, and under
  the CPU interpreter, which cannot run its inline PTX, it builds fp32 floats from the codes' bits.
- `mm_*`: 2..MAX_ROWS input rows. The dequantized weight tile goes through `tl.dot` (rows padded to 16).

Both compute the same sums as dequantize-then-matmul, in a different order (and without rounding the
dequantized weight to 16 bits), so results agree to rounding. Nothing here runs unless Triton imports and the
tensors are on a CUDA device, or TRITON_INTERPRET=1 is set (the CPU test suite runs the kernels
that way, slowly, on small shapes).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

import torch

MAX_ROWS = 32  # the most rows measured (a batch of 32 decoding): beyond, dequantize + cuBLAS
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_kernels: ModuleType | None = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class QuantWeight(NamedTuple):
    """A quantized projection as plain tensors, for code that calls `quant_matmul` directly (the fast decoder,
    under CUDA graphs and torch.compile). group_size 0 means int8 with a scale per row."""

    codes: torch.Tensor
    scales: torch.Tensor
    group_size: int


def available(device: torch.device) -> bool:
    return _HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and _interpreting()))


def kernels() -> ModuleType:
    """The kernels module, (re)loaded so that its @triton.jit functions match TRITON_INTERPRET as it is now."""
    global _kernels
    if _kernels is None:
        _kernels = importlib.import_module(f"{__package__}.triton_kernels")
    # Also when first taken: whoever imported the module before (a test walking every module, say) may have
    # done so under the other setting.
    if getattr(_kernels, "INTERPRETED", False) != _interpreting():
        _kernels = importlib.reload(_kernels)
    return _kernels


@dataclass(frozen=True)
class KernelConfig:
    block_n: int
    block_k: int  # input elements per iteration (a multiple of the int4 group size)
    split_k: int = 1
    num_warps: int = 4
    words: bool = False  # int8, one row: read the codes as 32-bit words (int4 always does)
    num_stages: int = 3  # Triton's software pipelining depth of the K loop (its default on CUDA)


def pick_config(method: str, rows: int, n: int, k: int, group_size: int = 0) -> KernelConfig:
    """Tile sizes for a layer shape, from sweeps over the Qwen2.5-7B projections on an H200, with weights
    cycled past the L2 cache (bench/quant_kernels.py --sweep). One row: narrow tiles over long K slices for
    layers with few outputs (k/v: 512), so hundreds of programs stream at once; the long rows of the down
    projection (18,944 inputs) are split over K. Several rows: the tl.dot kernels, split over K until every
    SM has a few programs (`--sweep-rows 16,32` for the wider tiles from 16 rows)."""
    if rows == 1:
        if n <= 1024:
            return KernelConfig(4, 2048, 1, num_warps=8, words=True)
        if method == "int4":  # the sweep of gemv_int4_halves
            if k >= 8192:
                return KernelConfig(32, max(512, group_size), 8, num_warps=2, words=True)
            if n >= 65536:  # an output layer over the vocabulary
                return KernelConfig(16, max(512, group_size), 1, num_warps=2, words=True)
            return KernelConfig(16, max(2048, group_size), 1, num_warps=8 if n <= 8192 else 4, words=True)
        if k >= 8192:
            return KernelConfig(16, 512, 4, num_warps=4, words=True)
        return KernelConfig(16, 512, 1, num_warps=4, words=True)
    # From 16 rows (int8) or 32 (int4) wider tiles: each weight tile, dequantized once, serves more rows. int4's
    # dequantizing is then the bound, not memory, so it takes more programs (sweep at 16 and 32 rows).
    wide = rows >= (16 if method == "int8" else 32)
    block_n = 64 if wide else 32
    block_k = (128 if wide else 256) if method == "int8" else max(64, group_size)
    steps = -(-k // block_k)
    split = 1
    while split * 2 <= steps and k // (split * 2) >= 2048:
        split *= 2
    programs = -(-n // block_n)
    enough = 1024 if wide and method == "int4" else 264
    while programs * split < enough and steps // (split * 2) >= 2 and split < 8:
        split *= 2
    return KernelConfig(block_n, block_k, split, num_warps=4)


def _launch(method: str, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, n: int, group_size: int,
            cfg: KernelConfig) -> torch.Tensor:
    kern = kernels()
    m, k = x.shape
    split = cfg.split_k
    out_dtype = x.dtype if split == 1 else torch.float32
    y = torch.empty((split, m, n), dtype=out_dtype, device=x.device)
    grid = (-(-n // cfg.block_n), split)
    common: dict[str, Any] = dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, num_warps=cfg.num_warps,
                                  num_stages=cfg.num_stages)
    if m == 1:
        if method == "int8":
            if cfg.words and k % 4 == 0:
                kern.gemv_int8_words[grid](x, codes.view(torch.int32), scales, y, n, k, **common)
            else:
                kern.gemv_int8[grid](x, codes, scales, y, n, k, **common)
        elif x.dtype in (torch.bfloat16, torch.float16) and not _interpreting():
            kern.gemv_int4_halves[grid](x, codes.view(torch.int32), scales, y, n, k, GROUP=group_size, **common)
        else:  # fp32 activations keep fp32 products; the CPU interpreter cannot run inline PTX
            kern.gemv_int4_words[grid](x, codes.view(torch.int32), scales, y, n, k, GROUP=group_size, **common)
    else:
        block_m = max(16, 1 << (m - 1).bit_length())  # the rows, padded to what tl.dot takes
        if method == "int8":
            kern.mm_int8[grid](x, codes, scales, y, m, n, k, x.stride(0), BLOCK_M=block_m, **common)
        else:
            common["BLOCK_K"] = group_size
            kern.mm_int4[grid](x, codes, scales, y, m, n, k, x.stride(0), GROUP=group_size, BLOCK_M=block_m, **common)
    return y[0] if split == 1 else y.sum(0).to(x.dtype)


def supports(method: str, x: torch.Tensor, group_size: int = 0) -> bool:
    """Can a kernel here take this input? (rows, dtype, device, and shapes the tiles assume)."""
    if not available(x.device) or x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        return False
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.stride(-1) != 1:
        return False
    if x.dtype == torch.float32 and x.shape[0] > 1:
        return False  # tl.dot would round fp32 inputs to tf32
    if method == "int4":
        return group_size >= 16 and group_size & (group_size - 1) == 0 and x.shape[1] % group_size == 0
    return True


def int8_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                cfg: KernelConfig | None = None) -> torch.Tensor:
    """x [M, K] @ (codes [N, K] int8 * scales [N])^T -> [M, N] in x.dtype."""
    n, k = codes.shape
    return _launch("int8", x, codes, scales, n, 0, cfg or pick_config("int8", x.shape[0], n, k))


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int,
                cfg: KernelConfig | None = None) -> torch.Tensor:
    """x [M, K] @ dequantized int4 weight^T -> [M, N]; packed [N, K/2] canonical, scales [N, K/group_size]."""
    n, half = packed.shape
    k = half * 2
    return _launch("int4", x, packed, scales.contiguous(), n, group_size,
                   cfg or pick_config("int4", x.shape[0], n, k, group_size))


def dequantize(method: str, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
               group_size: int = 0) -> torch.Tensor:
    """The whole weight in `dtype`, in one pass (torch's unpack-cast-scale chain makes several full-size
    temporaries: 380-610 us for a 7B MLP matrix on an H200). Bit-identical to quant_math's dequantize."""
    kern = kernels()
    n = codes.shape[0]
    k = codes.shape[1] * (2 if method == "int4" else 1)
    out = torch.empty((n, k), dtype=dtype, device=codes.device)
    block_n, block_k = 32, 128
    grid = (-(-n // block_n), -(-k // block_k))
    if method == "int8":
        kern.dequant_int8[grid](codes, scales, out, n, k, BLOCK_N=block_n, BLOCK_K=block_k)
    else:
        kern.dequant_int4[grid](codes, scales.contiguous(), out, n, k, GROUP=group_size, BLOCK_N=block_n,
                                BLOCK_K=block_k)
    return out


@torch.library.custom_op("qwenbook::quant_matmul", mutates_args=())
def quant_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] @ W^T for a QuantWeight's tensors. An opaque operator to torch.compile, which fuses the
    elementwise work around it and leaves the matmul to these kernels."""
    method = "int4" if group_size else "int8"
    x = x.contiguous()
    if supports(method, x, group_size):
        if method == "int8":
            return int8_matmul(x, codes, scales)
        return int4_matmul(x, codes, scales, group_size)
    return x @ dequantize(method, codes, scales, x.dtype, group_size).t()


@quant_matmul.register_fake
def _quant_matmul_shape(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], codes.shape[0]))
