"""The paged engine's decode-only step: fixed buffers per batch-size bucket, replayed as one CUDA graph.

Most engine steps only decode (every row feeds its one last token). Run eagerly, such a step of a 7B model
launches about a thousand small kernels from Python, and on a GPU that launching, not the weights' reading,
sets the speed. Here a decode step reads everything it needs from fixed device buffers — token ids,
positions, cache slots to write, block tables and lengths for `paged_decode_attention`, each row's adapter —
so it can be captured once per bucket of batch sizes (1, 2, 4, 8, 16, 24, 32, 48, 64, ...) and replayed:
a batch of 5 rows runs the 8-row graph with three padding rows that write to a scratch block and attend
over nothing. The host fills the buffers with one copy per step.

LoRA in the step (Punica/S-LoRA style, shaped for a graph): the loaded adapters' A matrices are stacked
[adapters * rank, in] and their B matrices [adapters * rank, out] (scale folded in, zero beyond each
adapter's own rank), so `(x A^T * mask) B` adds each row's own adapter and nothing for base-model rows, in
three kernels per projection whatever the mix of adapters. A step without adapter rows runs a graph without
the LoRA kernels, so an adapter that is loaded but not used costs nothing.

On the CPU (and with cuda_graphs off) the same function runs eagerly, so the CPU tests check the step the GPU
replays.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qwenbook_bridge.engine.generate.fast_ops import (FusedQKV, Weight, attn_in, attn_out, final_logits,
    heads_with_rope, lin, rms_norm)
from qwenbook_bridge.engine.generate.paged.attention import paged_decode_attention
from qwenbook_bridge.engine.generate.paged.chunks import SeqChunk

# Batch sizes a graph is captured for; a batch runs the smallest bucket that holds it.
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Row fields of the step buffer (one int64 tensor, so the host sends them in one copy).
_IDS, _POS, _SLOT, _LEN, _ADAPTER = range(5)


def block_tables(chunks: list[SeqChunk], block_size: int, pad_rows: int = 0) -> Tensor:
    """The block ids each decode row attends over (its blocks up to its position), one int32 row per chunk and
    zeros beyond a row's own blocks and in `pad_rows` padding rows; built from Python lists in one tensor
    (element-wise tensor writes cost microseconds each, a lot at 64 rows)."""
    heads = [c.block_table[: c.start // block_size + 1] for c in chunks]
    width = max(len(t) for t in heads)
    return torch.tensor([t + [0] * (width - len(t)) for t in heads] + [[0] * width] * pad_rows, dtype=torch.int32)


def buckets_up_to(max_batch: int) -> list[int]:
    return [b for b in BUCKETS if b < max_batch] + [max_batch]


def lora_lin(x: Tensor, w: Weight, b: Tensor | None, a: Tensor, bt: Tensor, mask: Tensor) -> Tensor:
    """A projection plus every row's own adapter: lin(x) + ((x A^T) * mask) Bt, where A [C, in] and Bt [C, out]
    stack the loaded adapters' matrices and mask [rows, C] keeps each row's adapter's columns."""
    return torch.addmm(lin(x, w, b), F.linear(x, a) * mask, bt)


def lora_attn_in(x: Tensor, cos: Tensor, sin: Tensor, eps: float, num_heads: int, num_kv_heads: int, head_dim: int,
                 input_norm: Tensor, q_norm: Tensor | None, k_norm: Tensor | None, mask: Tensor,
                 *projections: Any) -> tuple[Tensor, Tensor]:
    """fast_ops.attn_in with LoRA: `projections` is (w, b, a, bt) for the fused q/k/v matrix (mask then covers its
    three column groups), or three such groups for q, k and v. Only tensors, so torch.compile traces it once
    for every layer (modules would make it specialise on each)."""
    h = rms_norm(x, input_norm, eps)
    if len(projections) == 4:
        q, k, v = lora_lin(h, *projections, mask).split(
            (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim), dim=-1)
    else:
        q, k, v = (lora_lin(h, *projections[i:i + 4], mask) for i in (0, 4, 8))
    return heads_with_rope(q, k, v, cos, sin, eps, num_heads, num_kv_heads, head_dim, q_norm, k_norm)


def lora_attn_out(x: Tensor, attn: Tensor, eps: float, post_norm: Tensor, mask: Tensor, *projections: Any) -> Tensor:
    """fast_ops.attn_out with LoRA; `projections` is (w, a, bt) for o, gate, up and down in that order."""
    o, gate, up, down = (projections[i:i + 3] for i in (0, 3, 6, 9))
    x = x + lora_lin(attn, o[0], None, o[1], o[2], mask)
    h = rms_norm(x, post_norm, eps)
    inner = F.silu(lora_lin(h, gate[0], None, gate[1], gate[2], mask)) * lora_lin(h, up[0], None, up[1], up[2], mask)
    return x + lora_lin(inner, down[0], None, down[1], down[2], mask)


class DecodeStep:
    """Decode-only steps of a PagedRunner: `run(chunks)` -> float32 logits [len(chunks), vocab]."""

    # `runner` is the PagedRunner that owns this step (typed loosely: runner.py imports this module).
    def __init__(self, runner: Any, max_batch: int, max_blocks_per_seq: int, scratch_slot: int,
                 cuda_graphs: bool, fuse_qkv: bool, compile: bool = False) -> None:
        self.runner = runner
        # torch.compile fuses each layer's small element-wise kernels (norms, RoPE, SwiGLU, residuals, the LoRA
        # masks) around the matmuls; with dynamic shapes one compilation serves every bucket and every layer.
        self.attn_in: Any = attn_in
        self.attn_out: Any = attn_out
        self._lora_in: Any = lora_attn_in
        self._lora_out: Any = lora_attn_out
        self._final: Any = final_logits
        layers = runner.weights.layers
        # int8/int4 layers without their Triton kernels run a Python forward per layer: compiling around them
        # would specialise on every layer, so they stay eager (as in FastDecoder).
        modules = any(isinstance(w, torch.nn.Module)
                      for lw in layers for w in (*lw.attn_in_args(), *lw.attn_out_args()))
        if compile and not modules:
            from qwenbook_bridge.engine.generate.fast_decode import allow_recompiles

            allow_recompiles()
            self.attn_in = torch.compile(attn_in, dynamic=True, fullgraph=True)
            self.attn_out = torch.compile(attn_out, dynamic=True, fullgraph=True)
            self._lora_in = torch.compile(lora_attn_in, dynamic=True, fullgraph=True)
            self._lora_out = torch.compile(lora_attn_out, dynamic=True, fullgraph=True)
            self._final = torch.compile(final_logits, dynamic=True, fullgraph=True)
        self.buckets = buckets_up_to(max_batch)
        self.max_batch = self.buckets[-1]
        self.scratch_slot = scratch_slot
        self.use_graphs = cuda_graphs
        dev = runner.device
        self.rows = torch.zeros(5, self.max_batch, dtype=torch.long, device=dev)
        self.tables = torch.zeros(self.max_batch, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self._host_rows = torch.zeros(5, self.max_batch, dtype=torch.long, pin_memory=dev.type == "cuda")
        self._graphs: dict[tuple[int, bool], tuple[Any, Tensor]] = {}
        self._pool: Any = None
        # The runner slot of each stacked LoRA column (None: no adapter loaded); column c is slot slots[c // rank].
        self._lora_columns: Tensor | None = None
        # Per layer: (q/k/v projections, o/gate/up/down projections) with their stacked LoRA matrices.
        self._lora_args: list[tuple[tuple[Any, ...], tuple[Any, ...]]] = []
        self._fused = FusedQKV(runner.weights) if fuse_qkv and FusedQKV.applies(runner.weights) else None
        self.refresh_weights()

    # ---- weights and adapters -------------------------------------------------------------------------

    @torch.inference_mode()
    def refresh_weights(self) -> None:
        """Copy the model's q/k/v weights into the fused matrices (after a park that may have changed them)."""
        if self._fused is not None:
            self._fused.refresh()

    @torch.inference_mode()
    def adapters_changed(self) -> None:
        """Restack the loaded adapters' LoRA matrices; graphs that used the old ones are dropped."""
        self._graphs = {key: g for key, g in self._graphs.items() if not key[1]}
        r = self.runner
        loaded = sorted(r.loaded_adapters())
        self._lora_columns, self._lora_args = None, []
        if not loaded:
            return
        # One rank for every adapter (the largest loaded, rounded up to 8) keeps the stacking a plain reshape.
        top = max(t.table.rank[s] for layer in r._lora for t in layer.values() for s in loaded)
        rank = max(8, -(-top // 8) * 8)
        rank = min(rank, r.max_rank)
        self._lora_columns = torch.tensor(loaded, dtype=torch.long, device=r.device).repeat_interleave(rank)
        idx = torch.tensor(loaded, dtype=torch.long, device=r.device)

        def stacked(name: str, layer: int) -> tuple[Tensor, Tensor]:
            t = r._lora[layer][name].table
            a = t.a.index_select(0, idx)[:, :rank].reshape(-1, t.a.shape[-1])
            # peft scales B(A(x)); folding the scale into B is the same product up to rounding.
            b = t.b.index_select(0, idx)[:, :, :rank] * t.scale.index_select(0, idx).to(t.b.dtype)[:, None, None]
            return a.contiguous(), b.permute(0, 2, 1).reshape(-1, t.b.shape[1]).contiguous()

        for i, lw in enumerate(r.weights.layers):
            out: list[Any] = []
            for name, base in (("o_proj", lw.o_weight), ("gate_proj", lw.gate_weight), ("up_proj", lw.up_weight),
                               ("down_proj", lw.down_weight)):
                out += [base, *stacked(name, i)]
            if self._fused is not None:
                parts = [stacked(n, i) for n in ("q_proj", "k_proj", "v_proj")]
                weight, bias = self._fused.stacked[i]
                # Block-diagonal B: q's columns feed only q's outputs, and so on (the mask repeats three times).
                inp: list[Any] = [weight, bias, torch.cat([p[0] for p in parts]),
                                  torch.block_diag(*[p[1] for p in parts])]
            else:
                inp = []
                for n, w, b in (("q_proj", lw.q_weight, lw.q_bias), ("k_proj", lw.k_weight, lw.k_bias),
                                ("v_proj", lw.v_weight, lw.v_bias)):
                    inp += [w, b, *stacked(n, i)]
            self._lora_args.append((tuple(inp), tuple(out)))

    def layer_args(self, i: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """Layer i's base weights as attn_in/attn_out take them (q/k/v fused where they are)."""
        lw = self.runner.weights.layers[i]
        return (lw.attn_in_args() if self._fused is None else self._fused.in_args(i)), lw.attn_out_args()

    # ---- the step -------------------------------------------------------------------------------------

    def fits(self, chunks: list[SeqChunk]) -> bool:
        return len(chunks) <= self.max_batch and all(len(c.token_ids) == 1 and c.logits for c in chunks)

    @torch.inference_mode()
    def run(self, chunks: list[SeqChunk]) -> Tensor:
        n = len(chunks)
        bucket = next(b for b in self.buckets if b >= n)
        lora = self._lora_columns is not None and any(c.adapter >= 0 for c in chunks)
        bs = self.runner.block_size
        pad = bucket - n
        starts = [c.start for c in chunks]
        # Python lists into one tensor: element-wise writes into a tensor cost microseconds each, a lot at 64 rows.
        self._host_rows[:, :bucket] = torch.tensor([
            [c.token_ids[0] for c in chunks] + [0] * pad,
            starts + [0] * pad,
            [c.block_table[p // bs] * bs + p % bs for c, p in zip(chunks, starts)] + [self.scratch_slot] * pad,
            [p + 1 for p in starts] + [0] * pad,
            [c.adapter for c in chunks] + [-1] * pad])
        host = self._host_rows
        tables = block_tables(chunks, bs, pad)
        width = tables.shape[1]
        # Beyond `width` a row's table keeps stale block ids; the kernel reads only blocks below the row's length.
        self.tables[:bucket, :width].copy_(tables, non_blocking=True)
        self.rows[:, :bucket].copy_(host[:, :bucket], non_blocking=True)
        if not self.use_graphs:
            # Eagerly, attention needs only the columns in use: the reference kernel reads every column it is
            # given, and the full width covers the whole context (2048 blocks for a 32k model).
            return self._forward(bucket, lora, width)[:n]
        entry = self._graphs.get((bucket, lora))
        if entry is None:
            entry = self._capture(bucket, lora)
        entry[0].replay()
        return entry[1][:n]

    def _forward(self, b: int, lora: bool, width: int | None = None) -> Tensor:
        r = self.runner
        s, w = r.weights.shape, r.weights
        ids, pos, slot = self.rows[_IDS, :b], self.rows[_POS, :b], self.rows[_SLOT, :b]
        lengths = self.rows[_LEN, :b].to(torch.int32)
        tables = self.tables[:b, :width]
        x = F.embedding(ids, w.embed)
        cos, sin = r.rope(pos)
        args = (s.rms_eps, s.num_heads, s.num_kv_heads, s.head_dim)
        scale = 1.0 / math.sqrt(s.head_dim)
        if lora:
            assert self._lora_columns is not None
            mask = (self.rows[_ADAPTER, :b, None] == self._lora_columns[None]).to(x.dtype)
            in_mask = mask.repeat(1, 3) if self._fused is not None else mask
        for i, kv in enumerate(r.kv):
            if lora:
                lw = w.layers[i]
                lora_in, lora_out = self._lora_args[i]
                q, new_kv = self._lora_in(x, cos, sin, *args, lw.input_norm, lw.q_norm, lw.k_norm, in_mask, *lora_in)
            else:
                in_args, out_args = self.layer_args(i)
                q, new_kv = self.attn_in(x, cos, sin, *args, *in_args)
            kv.index_copy_(1, slot, new_kv)
            attn = paged_decode_attention(q, kv[0], kv[1], tables, lengths, r.block_size, scale).reshape(b, -1)
            if lora:
                x = self._lora_out(x, attn, s.rms_eps, lw.post_norm, mask, *lora_out)
            else:
                x = self.attn_out(x, attn, s.rms_eps, *out_args)
        return self._final(x, w.final_norm, w.lm_head, s.rms_eps)

    def _capture(self, b: int, lora: bool) -> tuple[Any, Tensor]:
        dev = self.runner.device
        # Warm-up and capture run on the buffers as they are; the real rows are written back afterwards. They
        # must not touch the cache, so for now every row is padding: scratch slot, nothing to attend over.
        saved = self.rows[:, :b].clone()
        self.rows[:, :b] = 0
        self.rows[_SLOT, :b] = self.scratch_slot
        self.rows[_ADAPTER, :b] = -1
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # Triton kernels compile and cuBLAS picks its algorithms here, not in the capture
                self._forward(b, lora)
        torch.cuda.current_stream(dev).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(b, lora)
        self.rows[:, :b].copy_(saved)
        self._graphs[(b, lora)] = (graph, out)
        return graph, out
