"""The Triton kernels behind paged/attention.py (imported only when a kernel is about to run).

`decode_partial` runs on a grid (rows, kv heads, splits): one program takes every query head of one KV head's
group over one partition of a row's positions, reading the K/V slots through the row's block table, and keeps
an online softmax in fp32. With one split it writes the attention output; with several it writes its partial
(max, sum, unnormalised output) and `decode_reduce`, on a grid (rows, query heads), merges the partitions.
Scores use base-2 exponentials: the caller folds log2(e) into `scale`.
"""

import os

import triton
import triton.language as tl

# Only Triton builtins, the standard combiners and this module's functions are used in the kernels: the helpers
# triton.language writes with @jit (tl.max, tl.sum, tl.zeros) are bound to the TRITON_INTERPRET setting of the
# first triton import, which broke the interpreter in a process that imported triton before. The interpreter
# recognises the standard combiners and reduces in numpy.


@triton.jit
def row_max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def row_sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


# Run-time integers are not specialised on (Triton otherwise compiles a variant for each pattern of
# divisibility by 16 and equality to 1 it sees): an eager step's table width, split count and partition change
# from step to step, and every new variant cost a compile of some 100 ms in the middle of serving.
@triton.jit(do_not_specialize=["stride_tb", "max_blocks", "partition", "num_splits"])
def decode_partial(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, scale,
                   stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_tb,
                   stride_ob, stride_oh, num_heads, max_blocks, partition, num_splits,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    # partition and num_splits are run-time values: as constants, every new table width or batch size of an
    # eager step would compile the kernel again (a few hundred milliseconds each on a GPU).
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.minimum(tl.load(lens_ptr + b), max_blocks * BLOCK_SIZE)  # never read past the table
    lo = split * partition
    hi = tl.minimum(lo + partition, seq_len)
    busy = lo < hi  # a partition past the row's length (or a padding row) loads and computes nothing

    g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + g
    d = tl.arange(0, HEAD_PAD)
    head_ok = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :] & busy
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=head_ok, other=0.0)

    m = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l = tl.full((GROUP_PAD,), 0.0, dtype=tl.float32)
    acc = tl.full((GROUP_PAD, HEAD_PAD), 0.0, dtype=tl.float32)
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    for start in range(lo, hi, TILE):
        # Every tile holds at least one visible position, so its max is finite and no exp2(-inf - -inf) occurs.
        pos = start + tl.arange(0, TILE)
        ok = pos < hi
        block = tl.load(table_ptr + b * stride_tb + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_ok = ok[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_base + slot[:, None] * stride_kn + d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, TILE], fp32
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, row_max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + row_sum(p, 1)
        v = tl.load(v_base + slot[:, None] * stride_vn + d[None, :], mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    store_ok = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    if not SPLIT:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]  # a row of length 0 gives zeros
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_ok)
    else:
        part = (b * num_heads + heads) * num_splits + split  # scratch [rows, heads, splits(, head_dim)]
        tl.store(m_ptr + part, m, mask=g < GROUP)
        tl.store(l_ptr + part, l, mask=g < GROUP)
        # An idle partition writes only its max (-inf): the reduction reads nothing else of it.
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=store_ok & busy)


@triton.jit(do_not_specialize=["num_splits"])
def decode_reduce(m_ptr, l_ptr, acc_ptr, out_ptr, stride_ob, stride_oh, num_heads, num_splits,
                  HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, CHUNK: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    base = (b * num_heads + h) * num_splits
    # Two passes over the partitions in chunks (the largest max first, then the weighted sums), so no constant
    # depends on the split count and one compiled kernel serves every plan.
    top = tl.full((), float("-inf"), dtype=tl.float32)
    for c0 in range(0, num_splits, CHUNK):
        c = c0 + tl.arange(0, CHUNK)
        top = tl.maximum(top, row_max(tl.load(m_ptr + base + c, mask=c < num_splits, other=float("-inf")), 0))
    top = tl.where(top == float("-inf"), 0.0, top)  # all partitions idle (length 0): every weight becomes 0
    d = tl.arange(0, HEAD_PAD)
    acc = tl.full((HEAD_PAD,), 0.0, dtype=tl.float32)
    total = tl.full((), 0.0, dtype=tl.float32)
    for c0 in range(0, num_splits, CHUNK):
        c = c0 + tl.arange(0, CHUNK)
        m_c = tl.load(m_ptr + base + c, mask=c < num_splits, other=float("-inf"))
        used = (c < num_splits) & (m_c > float("-inf"))
        w = tl.where(used, tl.exp2(m_c - top), 0.0)
        l_c = tl.load(l_ptr + base + c, mask=used, other=0.0)
        total += row_sum(w * l_c, 0)
        part = tl.load(acc_ptr + (base + c)[:, None] * HEAD_DIM + d[None, :],
                       mask=used[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        acc += row_sum(part * w[:, None], 0)
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


# What attention._kernels_module() compares with the environment to know whether to reload this module.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
