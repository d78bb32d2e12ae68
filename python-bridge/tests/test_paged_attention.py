"""Paged decode attention: the PyTorch reference against plain SDPA over gathered positions, and the Triton
kernel, run on the CPU through Triton's interpreter (TRITON_INTERPRET=1), against the reference.

The cases mix lengths (0 for a padding row, lengths ending mid-block, lengths spanning several partitions),
grouped-query heads and block tables whose ids are shuffled over the cache. The interpreter's tl.dot cannot
take bfloat16, so half precision is checked in float16 here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenbook_bridge.engine.generate.paged import attention
from qwenbook_bridge.engine.generate.paged.attention import (PagedAttentionConfig, paged_decode_attention,
                                                             paged_decode_attention_reference, plan_splits)


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _case(lens: list[int], heads: int = 4, kv_heads: int = 2, head_dim: int = 16, block_size: int = 4,
          max_blocks: int | None = None, dtype: torch.dtype = torch.float32, seed: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k_cache, v_cache, block_tables, seq_lens: each row's blocks drawn without repeats from a shuffled
    cache twice as large as needed, so tables are neither contiguous nor ordered."""
    gen = torch.Generator().manual_seed(seed)
    width = max_blocks or max(1, -(-max(lens) // block_size))
    num_blocks = 2 * len(lens) * width
    k_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(len(lens), heads, head_dim, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen)[:len(lens) * width].reshape(len(lens), width)
    return q, k_cache, v_cache, tables.to(torch.int32), torch.tensor(lens, dtype=torch.int32)


def _sdpa_over_gathered(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                        lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """One row at a time: its positions' slots looked up one by one, then SDPA with grouped-query heads."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    for b, n in enumerate(lens.tolist()):
        if n == 0:
            continue
        slots = [int(tables[b, p // block_size]) * block_size + p % block_size for p in range(n)]
        keys = k_cache[slots].float().transpose(0, 1)[None]  # [1, kv_heads, n, head_dim]
        values = v_cache[slots].float().transpose(0, 1)[None]
        got = F.scaled_dot_product_attention(q[b].float()[None, :, None], keys, values, scale=scale, enable_gqa=True)
        out[b] = got[0, :, 0]
    return out


LENS = [0, 1, 5, 17, 40, 63]  # a padding row, lengths ending mid-block and on a block's end


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 1), (3, 3)])
def test_reference_equals_sdpa_over_the_gathered_positions(heads: int, kv_heads: int) -> None:
    q, k, v, tables, lens = _case(LENS, heads, kv_heads, max_blocks=20)  # wider than any row needs
    got = paged_decode_attention_reference(q, k, v, tables, lens, 4, 0.3)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    torch.testing.assert_close(got, _sdpa_over_gathered(q, k, v, tables, lens, 4, 0.3), rtol=1e-5, atol=1e-5)


# The table holds 64 positions: 2 partitions of 2 tiles of 16 (rows 40 and 63 span both), or as many as
# there are tiles (16 asked, 4 made), most of them idle for the short rows.
SPLIT_2 = PagedAttentionConfig(tile_tokens=16, num_splits=2)
SPLIT_16 = PagedAttentionConfig(tile_tokens=16, num_splits=16)


@pytest.mark.parametrize("heads,kv_heads,config,splits", [
    (4, 2, None, 1),  # the default plan: one partition over these short rows, the output written directly
    (4, 2, SPLIT_2, 2), (8, 2, SPLIT_16, 4), (2, 2, SPLIT_2, 2)])
def test_kernel_equals_reference_in_fp32(interpret: None, heads: int, kv_heads: int,
                                         config: PagedAttentionConfig | None, splits: int) -> None:
    q, k, v, tables, lens = _case(LENS, heads, kv_heads)
    assert plan_splits(len(LENS), kv_heads, 16, 4, q.device, config or PagedAttentionConfig()).num_splits == splits
    want = paged_decode_attention_reference(q, k, v, tables, lens, 4, 0.25)
    got = paged_decode_attention(q, k, v, tables, lens, 4, 0.25, config=config)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert not got.isnan().any() and torch.equal(got[0], torch.zeros_like(got[0]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kernel_splits_long_rows_into_partitions_by_the_table_width(interpret: None) -> None:
    # 200 blocks of 4 positions: the default plan cuts the table into partitions of 256 (a whole number of
    # 64-position tiles and of blocks); the rows end inside the fourth, second and first.
    plan = plan_splits(3, 2, 200, 4, torch.device("cpu"))
    assert (plan.tile, plan.partition, plan.num_splits) == (64, 256, 4)
    q, k, v, tables, lens = _case([800, 321, 7], max_blocks=200, seed=1)
    got = paged_decode_attention(q, k, v, tables, lens, 4, 0.25)
    torch.testing.assert_close(got, paged_decode_attention_reference(q, k, v, tables, lens, 4, 0.25),
                               rtol=1e-5, atol=1e-5)


def test_kernel_in_fp16_and_head_dim_64(interpret: None) -> None:
    q, k, v, tables, lens = _case([0, 9, 33], heads=8, kv_heads=2, head_dim=64, block_size=8, dtype=torch.float16)
    got = paged_decode_attention(q, k, v, tables, lens, 8, 64 ** -0.5,
                                 config=PagedAttentionConfig(tile_tokens=16, num_splits=2))
    assert got.dtype == torch.float16
    want = _sdpa_over_gathered(q, k, v, tables, lens, 8, 64 ** -0.5)
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-3)


def test_kernel_writes_into_a_strided_out(interpret: None) -> None:
    q, k, v, tables, lens = _case([3, 30])
    backing = torch.full((2, 4, 24), 7.0)
    out = backing[:, :, 4:20]  # rows and heads strided, head_dim contiguous
    for config in (None, PagedAttentionConfig(tile_tokens=16, num_splits=2)):
        assert paged_decode_attention(q, k, v, tables, lens, 4, 0.25, out, config=config) is out
        torch.testing.assert_close(out, paged_decode_attention_reference(q, k, v, tables, lens, 4, 0.25),
                                   rtol=1e-5, atol=1e-5)
        assert (backing[:, :, :4] == 7).all() and (backing[:, :, 20:] == 7).all()


def test_the_kernel_runs_under_the_interpreter_and_the_reference_elsewhere(
        monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, tables, lens = _case([5, 12])
    want = paged_decode_attention_reference(q, k, v, tables, lens, 4, 0.25)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not attention.kernel_available(torch.device("cpu"))
    assert not attention._kernels_module().INTERPRETED
    bf16 = paged_decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), tables, lens, 4, 0.25)
    torch.testing.assert_close(bf16.float(), want, rtol=0, atol=3e-2)  # the reference, in bfloat16 inputs

    def refuse(*args: object) -> torch.Tensor:
        raise AssertionError("the reference ran where the kernel should")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(attention, "paged_decode_attention_reference", refuse)
    # The kernels module was loaded for the GPU just above: it is reloaded for the interpreter.
    torch.testing.assert_close(paged_decode_attention(q, k, v, tables, lens, 4, 0.25), want, rtol=1e-5, atol=1e-5)
    assert attention._kernels_module().INTERPRETED


def test_split_plan_fills_the_gpu_from_shapes_alone() -> None:
    gpu = torch.device("cpu")  # off CUDA the plan assumes an H200's 132 SMs
    small = plan_splits(1, 4, 2048, 16, gpu)  # Qwen2.5-7B, one row, a 32k table
    assert small.partition % 16 == 0 and small.partition % small.tile == 0
    assert 4 * small.num_splits >= 2 * 132 and small.num_splits * small.partition >= 2048 * 16
    assert plan_splits(128, 4, 2048, 16, gpu).num_splits == 1  # 512 programs already
    short = plan_splits(1, 4, 8, 16, gpu)  # 128 positions: not worth splitting below 256
    assert (short.num_splits, short.partition) == (1, 128)


@pytest.mark.parametrize("change,message", [
    (dict(q=torch.zeros(2, 3, 16)), "multiple of the cache's kv_heads"),
    (dict(q=torch.zeros(2, 4, 8)), "head_dim is 8"),
    (dict(q=torch.zeros(2, 64)), "q must be [batch, num_heads, head_dim]"),
    (dict(v_cache=torch.zeros(64, 2, 8)), "k_cache and v_cache must both be"),
    (dict(block_tables=torch.zeros(2, 4, dtype=torch.int64)), "block_tables must be int32"),
    (dict(block_tables=torch.zeros(3, 4, dtype=torch.int32)), "block_tables must be int32 [batch=2"),
    (dict(seq_lens=torch.zeros(3, dtype=torch.int32)), "seq_lens must be int32 [batch=2]"),
    (dict(k_cache=torch.zeros(64, 2, 16, dtype=torch.float16)), "must have q's dtype"),
    (dict(out=torch.zeros(2, 4, 8)), "out must be"),
])
def test_bad_shapes_are_refused_with_what_was_wrong(change: dict[str, torch.Tensor], message: str) -> None:
    args: dict[str, torch.Tensor | None] = dict(
        q=torch.zeros(2, 4, 16), k_cache=torch.zeros(64, 2, 16), v_cache=torch.zeros(64, 2, 16),
        block_tables=torch.zeros(2, 4, dtype=torch.int32), seq_lens=torch.zeros(2, dtype=torch.int32), out=None)
    args.update(change)
    for fn in (paged_decode_attention_reference, paged_decode_attention):
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            fn(args["q"], args["k_cache"], args["v_cache"], args["block_tables"], args["seq_lens"], 4, 0.25,
               args["out"])
