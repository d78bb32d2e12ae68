"""The Triton kernels behind engine/quant/triton_ops.py (imported only when a kernel is about to run).

Layouts: int8 codes [N, K] with one scale per row; int4 codes two to a byte (low nibble = even input index)
[N, K/2] with scales [N, K/GROUP]. Outputs go to y[pid_k] so split-K partial sums can be added afterwards.
"""

import os

import triton
import triton.language as tl


# Only Triton builtins and this module's own functions are called from the kernels: triton.language's jit-written
# helpers (cdiv, zeros, sum) are bound to whether TRITON_INTERPRET was set when triton was first imported, so in
# a process that imported it before (torch.compile does) the interpreter could not run them. A reduction with
# the standard sum combiner is what tl.sum compiles to, and the interpreter recognises it and sums in numpy.
@triton.jit
def total(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def k_range(pid_k, K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    steps = (K + BLOCK_K - 1) // BLOCK_K
    per = (steps + SPLIT_K - 1) // SPLIT_K
    start = pid_k * per * BLOCK_K
    stop = tl.minimum(start + per * BLOCK_K, K)
    return start, stop


@triton.jit
def out_rows(N, BLOCK_N: tl.constexpr):
    """This program's output rows (axis 0 of the grid) and which of them exist."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rn, rn < N


@triton.jit
def gemv_int8(x_ptr, w_ptr, s_ptr, y_ptr, N, K,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_k = tl.program_id(1)
    rn, n_ok = out_rows(N, BLOCK_N)
    start, stop = k_range(pid_k, K, BLOCK_K, SPLIT_K)
    acc = tl.full((BLOCK_N,), 0.0, dtype=tl.float32)
    for k0 in range(start, stop, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < stop
        x = tl.load(x_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        acc += total(w.to(tl.float32) * x[None, :], axis=1)
    acc *= tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + pid_k * N + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


# Integer-to-float conversions run at a quarter of the FP32 rate, which would cap a one-row product below the
# memory speed. The word kernels build the floats from bits instead: a code c in 0..255 ORed into the mantissa
# of 2^23 (0x4B000000) is the float 2^23 + c exactly, so one subtraction gives the code minus its offset.
MAGIC = tl.constexpr(0x4B000000)


@triton.jit
def load_words(w_ptr, rn, n_ok, K, k0, stop, rw, PER_WORD: tl.constexpr):
    """The codes of rows `rn` from input k0 on as 32-bit words (PER_WORD codes each), the first input of each
    word, and which words lie before `stop`."""
    kw = k0 + PER_WORD * rw
    w_ok = kw < stop
    words = tl.load(w_ptr + rn[:, None] * (K // PER_WORD) + (k0 // PER_WORD + rw)[None, :],
                    mask=n_ok[:, None] & w_ok[None, :], other=0)
    return kw, w_ok, words


@triton.jit
def gemv_int4_words(x_ptr, w_ptr, s_ptr, y_ptr, N, K, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    # The codes read as 32-bit words: word w of a row holds inputs 8w..8w+7, nibble j = input 8w + j
    # (little-endian bytes, low nibble first). Scales are applied per word.
    WORDS: tl.constexpr = BLOCK_K // 8
    pid_k = tl.program_id(1)
    rn, n_ok = out_rows(N, BLOCK_N)
    start, stop = k_range(pid_k, K, BLOCK_K, SPLIT_K)
    rw = tl.arange(0, WORDS)
    n_groups = K // GROUP
    acc = tl.full((BLOCK_N,), 0.0, dtype=tl.float32)
    for k0 in range(start, stop, BLOCK_K):
        kw, w_ok, words = load_words(w_ptr, rn, n_ok, K, k0, stop, rw, 8)
        part = tl.full((BLOCK_N, WORDS), 0.0, dtype=tl.float32)
        for j in tl.static_range(8):
            xj = tl.load(x_ptr + kw + j, mask=w_ok, other=0.0).to(tl.float32)
            c = (((words >> (4 * j)) & 15) | MAGIC).to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + 8
            part += c * xj[None, :]
        s = tl.load(s_ptr + rn[:, None] * n_groups + (kw // GROUP)[None, :], mask=n_ok[:, None] & w_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += total(part * s, axis=1)
    tl.store(y_ptr + pid_k * N + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


# One int4 row in packed half precision: two codes per instruction (Marlin's and FasterTransformer's trick). A
# 4-bit code ORed into the mantissa of 1024.0 (0x6400) is the half 1024 + code exactly, so a mask, one packed
# subtraction and one packed multiply-add handle two codes. The float-bit kernel above spends about four
# instructions per code and, for the 7B shapes on an H200, runs at 1.0-1.4 TB/s where this one reaches 1.7-3.0.
# Each 32-bit word (codes 0-7 of 8 inputs) is summed in f16x2 (four products per half) and then in fp32.
# Activations are scaled by a power of two, per BLOCK_K slice, so that no |x| exceeds 1024: a product is then at
# most 8192 and a half's sum of four at most 32768, under the half maximum (65504).
def _word_dots_ptx() -> str:
    """PTX for word_dots: $1 the codes' word, $2..$5 the activations' f16x2 pairs (inputs j and j + 4 of the word),
    $0 the fp32 sum. Pair j is the word shifted right by 4j, masked to the low nibble of each 16-bit half and ORed
    into 1024.0 (lop3: (a & b) | c), less 1032 (the code's offset of 8), times the pair, added into acc."""
    lines = [".reg .b32 t, d, acc, off;", ".reg .f16 lo, hi;", ".reg .f32 flo, fhi;",
             "mov.b32 off, 0x64086408;", "mov.b32 acc, 0;"]
    for j in range(4):
        lines += [f"shr.b32 t, $1, {4 * j};", "lop3.b32 d, t, 0x000F000F, 0x64006400, 0xEA;",
                  "sub.f16x2 d, d, off;", f"fma.rn.f16x2 acc, d, ${2 + j}, acc;"]
    lines += ["mov.b32 {lo, hi}, acc;", "cvt.f32.f16 flo, lo;", "cvt.f32.f16 fhi, hi;", "add.f32 $0, flo, fhi;"]
    return "{\n" + "\n".join(lines) + "\n}"


WORD_DOTS_PTX = tl.constexpr(_word_dots_ptx())


@triton.jit
def word_dots(words, x04, x15, x26, x37):
    return tl.inline_asm_elementwise(asm=WORD_DOTS_PTX, constraints="=r,r,r,r,r,r", args=[words, x04, x15, x26, x37],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def half_pair(lo, hi, scale):
    """Two activations as one f16x2 word: `lo` in the low half (the code in bits 0-3 of a 16-bit lane)."""
    lo16 = (lo * scale).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi16 = (hi * scale).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return lo16 | (hi16 << 16)


@triton.jit
def gemv_int4_halves(x_ptr, w_ptr, s_ptr, y_ptr, N, K, GROUP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    WORDS: tl.constexpr = BLOCK_K // 8
    G: tl.constexpr = BLOCK_K // GROUP
    pid_k = tl.program_id(1)
    rn, n_ok = out_rows(N, BLOCK_N)
    start, stop = k_range(pid_k, K, BLOCK_K, SPLIT_K)
    rw = tl.arange(0, WORDS)
    rg = tl.arange(0, G)
    acc = tl.full((BLOCK_N,), 0.0, dtype=tl.float32)
    for k0 in range(start, stop, BLOCK_K):
        kw, w_ok, words = load_words(w_ptr, rn, n_ok, K, k0, stop, rw, 8)
        x0 = tl.load(x_ptr + kw, mask=w_ok, other=0.0).to(tl.float32)
        x1 = tl.load(x_ptr + kw + 1, mask=w_ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + kw + 2, mask=w_ok, other=0.0).to(tl.float32)
        x3 = tl.load(x_ptr + kw + 3, mask=w_ok, other=0.0).to(tl.float32)
        x4 = tl.load(x_ptr + kw + 4, mask=w_ok, other=0.0).to(tl.float32)
        x5 = tl.load(x_ptr + kw + 5, mask=w_ok, other=0.0).to(tl.float32)
        x6 = tl.load(x_ptr + kw + 6, mask=w_ok, other=0.0).to(tl.float32)
        x7 = tl.load(x_ptr + kw + 7, mask=w_ok, other=0.0).to(tl.float32)
        big = tl.maximum(tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3))),
                         tl.maximum(tl.maximum(tl.abs(x4), tl.abs(x5)), tl.maximum(tl.abs(x6), tl.abs(x7))))
        top = tl.max(big, axis=0)  # (never interpreted: inline PTX below)
        up = tl.where(top > 1024.0, tl.exp2(tl.ceil(tl.log2(top / 1024.0))), 1.0)  # a power of two
        down = 1.0 / up
        part = word_dots(words, tl.broadcast_to(half_pair(x0, x4, down)[None, :], (BLOCK_N, WORDS)),
                         tl.broadcast_to(half_pair(x1, x5, down)[None, :], (BLOCK_N, WORDS)),
                         tl.broadcast_to(half_pair(x2, x6, down)[None, :], (BLOCK_N, WORDS)),
                         tl.broadcast_to(half_pair(x3, x7, down)[None, :], (BLOCK_N, WORDS)))
        per_group = total(tl.reshape(part, (BLOCK_N, G, GROUP // 8)), axis=2)
        g_ok = (k0 + rg * GROUP) < stop
        s = tl.load(s_ptr + rn[:, None] * (K // GROUP) + (k0 // GROUP + rg)[None, :],
                    mask=n_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
        acc += total(per_group * s, axis=1) * up
    tl.store(y_ptr + pid_k * N + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def gemv_int8_words(x_ptr, w_ptr, s_ptr, y_ptr, N, K,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    # Word w of a row holds inputs 4w..4w+3, byte j = input 4w + j. XOR 128 maps the signed byte to 0..255.
    WORDS: tl.constexpr = BLOCK_K // 4
    pid_k = tl.program_id(1)
    rn, n_ok = out_rows(N, BLOCK_N)
    start, stop = k_range(pid_k, K, BLOCK_K, SPLIT_K)
    rw = tl.arange(0, WORDS)
    acc = tl.full((BLOCK_N, WORDS), 0.0, dtype=tl.float32)
    for k0 in range(start, stop, BLOCK_K):
        kw, w_ok, words = load_words(w_ptr, rn, n_ok, K, k0, stop, rw, 4)
        for j in tl.static_range(4):
            xj = tl.load(x_ptr + kw + j, mask=w_ok, other=0.0).to(tl.float32)
            c = ((((words >> (8 * j)) & 255) ^ 128) | MAGIC).to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + 128
            acc += c * xj[None, :]
    out = total(acc, axis=1) * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + pid_k * N + rn, out.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def mm_int8(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn, n_ok = out_rows(N, BLOCK_N)
    m_ok = rm < M
    start, stop = k_range(pid_k, K, BLOCK_K, SPLIT_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(start, stop, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < stop
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))  # int8 codes are exact in 16-bit floats
    acc *= tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def mm_int4(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, GROUP: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    # BLOCK_K == GROUP: one scale per row per iteration.
    HALF: tl.constexpr = BLOCK_K // 2
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn, n_ok = out_rows(N, BLOCK_N)
    rb = tl.arange(0, HALF)
    m_ok = rm < M
    start, stop = k_range(pid_k, K, BLOCK_K, SPLIT_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(start, stop, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None], other=0.0)
        p = tl.load(w_ptr + rn[:, None] * (K // 2) + (k0 // 2 + rb)[None, :], mask=n_ok[:, None], other=0)
        lo = (p & 15).to(tl.float32) - 8.0
        hi = (p >> 4).to(tl.float32) - 8.0
        codes = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # interleaves back to input order
        s = tl.load(s_ptr + rn * (K // GROUP) + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
        w = (codes * s[:, None]).to(x.dtype)
        acc += tl.dot(x, tl.trans(w))
    out = y_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

@triton.jit
def dequant_int8(w_ptr, s_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn, n_ok = out_rows(N, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = n_ok[:, None] & (rk < K)[None, :]
    q = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=ok, other=0).to(tl.float32)
    s = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(out_ptr.dtype.element_ty).to(tl.float32)
    # The same rounding as torch's codes.to(dtype) * scales.to(dtype): a float product rounded once.
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], (q * s[:, None]).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def dequant_int4(w_ptr, s_ptr, out_ptr, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    HALF: tl.constexpr = BLOCK_K // 2
    rn, n_ok = out_rows(N, BLOCK_N)
    rb = tl.program_id(1) * HALF + tl.arange(0, HALF)
    p = tl.load(w_ptr + rn[:, None] * (K // 2) + rb[None, :], mask=n_ok[:, None] & (rb < K // 2)[None, :], other=0)
    codes = tl.reshape(tl.join((p & 15).to(tl.float32) - 8.0, (p >> 4).to(tl.float32) - 8.0), (BLOCK_N, BLOCK_K))
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = n_ok[:, None] & (rk < K)[None, :]
    s = tl.load(s_ptr + rn[:, None] * (K // GROUP) + (rk // GROUP)[None, :], mask=ok, other=0.0)
    w = codes * s.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


# What quant_triton.kernels() compares with the environment to know whether to reload this module.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
