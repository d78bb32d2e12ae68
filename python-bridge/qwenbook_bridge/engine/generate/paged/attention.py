"""Decode attention that reads the paged key/value cache in place.

Why: a decode row attends over its own positions, which live in scattered cache blocks. Gathering them into a
padded tensor for SDPA copies every key and value once more per layer and step, and its shape follows the
longest row, so a CUDA graph cannot capture it. `paged_decode_attention` reads the blocks where they are,
through each row's block table, with a launch whose grid depends only on tensor shapes (rows, KV heads, the
table's width) and never on the lengths, so one graph serves every step of a batch size.

How (on CUDA, or under TRITON_INTERPRET=1): split-K "flash decoding", as vLLM's paged attention v2. Each
program takes one row, one KV head with all the query heads of its group (as the rows of a tl.dot tile,
padded to 16), and one partition of the row's positions; it keeps an online softmax in fp32 and writes its
partial max, sum and output. A second small kernel merges the partitions. The number of partitions comes from
the table's width and the batch, so that a small batch still fills the GPU's SMs, and partitions past a
row's length do nothing. Elsewhere `paged_decode_attention_reference` does the same attention in plain
PyTorch, in fp32.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_kernels: ModuleType | None = None
_LOG2E = 1.0 / math.log(2.0)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels_module() -> ModuleType:
    """attention_kernels, (re)loaded so that its @triton.jit functions match TRITON_INTERPRET as it is now.
    Also on first use: a module imported earlier under the other setting (a test that imports every module,
    say) would otherwise look for a GPU driver when interpreted, or run interpreted on the GPU."""
    global _kernels
    if _kernels is None:
        _kernels = importlib.import_module(f"{__package__}.attention_kernels")
    if getattr(_kernels, "INTERPRETED", False) != _interpreting():
        _kernels = importlib.reload(_kernels)
    return _kernels


def kernel_available(device: torch.device) -> bool:
    """Whether paged_decode_attention runs the Triton kernel for tensors on this device."""
    return _HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and _interpreting()))


@dataclass(frozen=True)
class PagedAttentionConfig:
    """Launch settings of the kernel. The defaults aim at Qwen2.5-7B decoding on an H200 (head_dim 128,
    block_size 16); tests shrink them to get several partitions out of short sequences."""

    tile_tokens: int = 64  # positions per loop step: a power of two >= 16 (tl.dot); raised to block_size
    min_partition_tokens: int = 256  # a partition shorter than this costs more in merging than it saves
    programs_per_sm: int = 2  # splits are added until rows x KV heads x splits reaches this many per SM
    num_splits: int | None = None  # force a number of partitions (capped at one tile each)
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class SplitPlan:
    tile: int  # positions per loop step
    partition: int  # positions per program: a whole number of tiles
    num_splits: int


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter has no SMs; an H200's count keeps the plan the same as on the GPU


def plan_splits(batch: int, kv_heads: int, max_blocks: int, block_size: int, device: torch.device,
                config: PagedAttentionConfig = PagedAttentionConfig()) -> SplitPlan:
    """How the positions a block table can hold are cut into partitions. Depends on shapes only, so a CUDA
    graph captured for one table width stays valid whatever the lengths."""
    tile = max(config.tile_tokens, block_size)
    if tile & (tile - 1):
        tile = 1 << (tile - 1).bit_length()  # tl.arange needs a power of two
    tiles = max(1, -(-max_blocks * block_size // tile))
    if config.num_splits is not None:
        wanted = config.num_splits
    else:
        target = config.programs_per_sm * _sm_count(device)
        wanted = -(-target // max(1, batch * kv_heads))
        wanted = min(wanted, max(1, max_blocks * block_size // config.min_partition_tokens))
    per_split = tiles // max(1, min(wanted, tiles))  # rounded down: at least the splits wanted
    return SplitPlan(tile, per_split * tile, -(-tiles // per_split))


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor, block_size: int,
           out: Tensor | None) -> None:
    """Shape, dtype and device checks (no values: reading them would synchronise with the GPU)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, num_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache must both be [num_slots, kv_heads, head_dim], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    if k_cache.shape[2] != head_dim:
        raise ValueError(f"q's head_dim is {head_dim} but the cache's is {k_cache.shape[2]}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"num_heads ({heads}) must be a multiple of the cache's kv_heads ({kv_heads}) "
                         "for grouped-query attention")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"the cache ({k_cache.dtype}/{v_cache.dtype}) must have q's dtype ({q.dtype})")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [batch={batch}, max_blocks], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if seq_lens.shape != (batch,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be int32 [batch={batch}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, seq_lens)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)} on {q.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")


def paged_decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                                     seq_lens: Tensor, block_size: int, scale: float,
                                     out: Tensor | None = None) -> Tensor:
    """The same attention in PyTorch: each row's slots gathered over the whole table width, positions at or
    past the row's length masked, softmax and sums in fp32. No host synchronisation, so it also runs on a
    GPU inside a captured graph, at the cost of gathering the full table width."""
    _check(q, k_cache, v_cache, block_tables, seq_lens, block_size, out)
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    width = block_tables.shape[1] * block_size
    pos = torch.arange(width, device=q.device)
    visible = pos[None] < seq_lens[:, None].long()  # [batch, width]
    slots = block_tables.long().repeat_interleave(block_size, dim=1) * block_size + pos % block_size
    slots = torch.where(visible, slots, 0)  # entries past a row's length may hold anything
    keys = k_cache[slots].float()  # [batch, width, kv_heads, head_dim]
    # Slots past a row's length may never have been written (an empty CPU cache holds anything, NaN too), and
    # a zero weight times NaN is NaN: such values are zeroed, not only weighted by 0.
    values = torch.where(visible[:, :, None, None], v_cache[slots].float(), 0.0)
    grouped = q.float().reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = torch.einsum("bkgd,bwkd->bkgw", grouped, keys) * scale
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    top = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)  # a length 0 row: no -inf - -inf
    weights = torch.exp(scores - top)
    total = weights.sum(-1, keepdim=True)
    result = torch.einsum("bkgw,bwkd->bkgd", weights / torch.where(total > 0, total, 1.0), values)
    result = result.reshape(batch, heads, head_dim).to(q.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                           block_size: int, scale: float, out: Tensor | None = None, *,
                           config: PagedAttentionConfig | None = None) -> Tensor:
    """Attention of one new query per row over that row's cached positions.

    q [batch, num_heads, head_dim]; k_cache, v_cache [num_slots, kv_heads, head_dim] (head_dim contiguous);
    block_tables [batch, max_blocks] int32 (position p of row b is at slot
    block_tables[b, p // block_size] * block_size + p % block_size); seq_lens [batch] int32, the positions
    each row attends over including the one just written, 0 for a padding row (its output is zeros). Query
    head h reads KV head h // (num_heads // kv_heads). Returns [batch, num_heads, head_dim] in q's dtype,
    written into `out` when given. The Triton kernel runs on CUDA or under TRITON_INTERPRET=1 (where bfloat16
    is not supported: the interpreter's tl.dot cannot take it); otherwise the PyTorch reference does.
    """
    if not kernel_available(q.device):
        return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, out)
    _check(q, k_cache, v_cache, block_tables, seq_lens, block_size, out)
    if k_cache.stride(2) != 1 or v_cache.stride(2) != 1 or q.stride(2) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last (head_dim) dimension")
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    result = out if out is not None else torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return result
    if result.stride(2) != 1:
        raise ValueError("out needs a contiguous last (head_dim) dimension")
    cfg = config or PagedAttentionConfig()
    plan = plan_splits(batch, kv_heads, block_tables.shape[1], block_size, q.device, cfg)
    group = heads // kv_heads
    head_pad = max(16, 1 << (head_dim - 1).bit_length())
    splits = plan.num_splits
    if splits > 1:
        m = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=q.device)
    else:  # the kernel writes the output directly; these are never touched
        m = l = acc = result
    kern = _kernels_module()
    kern.decode_partial[(batch, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, m, l, acc, result, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_tables.stride(0), result.stride(0), result.stride(1), heads, block_tables.shape[1], plan.partition,
        splits, GROUP=group, GROUP_PAD=max(16, 1 << (group - 1).bit_length()), HEAD_DIM=head_dim, HEAD_PAD=head_pad,
        BLOCK_SIZE=block_size, TILE=plan.tile, SPLIT=splits > 1,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (no tf32 rounding)
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits > 1:
        kern.decode_reduce[(batch, heads)](
            m, l, acc, result, result.stride(0), result.stride(1), heads, splits,
            HEAD_DIM=head_dim, HEAD_PAD=head_pad, CHUNK=16, num_warps=4)
    return result
