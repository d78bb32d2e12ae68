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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qwenbook_bridge.engine.generate.fast_ops import Weight, attn_in, attn_out, final_logits, lin
from qwenbook_bridge.engine.generate.paged.attention import paged_decode_attention
from qwenbook_bridge.engine.generate.paged.chunks import SeqChunk

# Batch sizes a graph is captured for; a batch runs the smallest bucket that holds it.
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Row fields of the step buffer (one int64 tensor, so the host sends them in one copy).
_IDS, _POS, _SLOT, _LEN, _ADAPTER = range(5)


def buckets_up_to(max_batch: int) -> list[int]:
    return [b for b in BUCKETS if b < max_batch] + [max_batch]


class _StackedLora(torch.nn.Module):
    """A projection with every loaded adapter's LoRA beside it. fast_ops' `lin` calls a module weight as
    `w(x)`, so passing this in place of the weight leaves the shared layer math unchanged."""

    def __init__(self, base: Weight, bias: Tensor | None, a: Tensor, bt: Tensor, masks: dict[str, Tensor],
                 mask_key: str) -> None:
        super().__init__()
        self.base, self.bias_, self.a, self.bt, self.masks, self.mask_key = base, bias, a, bt, masks, mask_key

    def forward(self, x: Tensor) -> Tensor:
        y = lin(x, self.base, self.bias_)
        h = F.linear(x, self.a) * self.masks[self.mask_key]
        return torch.addmm(y, h, self.bt)


@dataclass
class _LoraLayout:
    """Which adapter slots the stacked matrices hold, and each column's slot: column c belongs to slots[c // rank]."""

    slots: list[int]
    rank: int
    column_slot: Tensor  # [len(slots) * rank] long: the runner slot of each column

    @property
    def width(self) -> int:
        return len(self.slots) * self.rank


class DecodeStep:
    """Decode-only steps of a PagedRunner: `run(chunks)` -> float32 logits [len(chunks), vocab]."""

    # `runner` is the PagedRunner that owns this step (typed loosely: runner.py imports this module).
    def __init__(self, runner: Any, max_batch: int, max_blocks_per_seq: int, scratch_slot: int,
                 cuda_graphs: bool, fuse_qkv: bool, compile: bool = False) -> None:
        self.runner = runner
        # torch.compile fuses each layer's small element-wise kernels (norms, RoPE, SwiGLU, residuals) around the
        # matmuls; with dynamic shapes one compilation serves every bucket. Steps with adapter rows stay eager
        # inside their graph: the LoRA modules would make the compiler specialise on each layer.
        self._attn_in: Any = attn_in
        self._attn_out: Any = attn_out
        self._final: Any = final_logits
        layers = runner.weights.layers
        # int8/int4 layers without their Triton kernels run a Python forward per layer: compiling around them
        # would specialise on every layer, so they stay eager (as in FastDecoder).
        modules = any(isinstance(w, torch.nn.Module) for lw in layers for w in (*lw.attn_in_args(), *lw.attn_out_args()))
        if compile and not modules:
            from qwenbook_bridge.engine.generate.fast_decode import allow_recompiles

            allow_recompiles()
            self._attn_in = torch.compile(attn_in, dynamic=True, fullgraph=True)
            self._attn_out = torch.compile(attn_out, dynamic=True, fullgraph=True)
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
        self._masks: dict[str, Tensor] = {}
        self._lora: _LoraLayout | None = None
        self._lora_args: list[tuple[tuple[Any, ...], tuple[Any, ...]]] = []
        # q/k/v stacked into one matrix per layer: one matrix-vector product instead of three (about 6% more
        # weight memory for a 7B model); refreshed from the model's weights after anything may have changed them.
        self._fused: list[tuple[Tensor, Tensor | None]] = []
        if fuse_qkv and all(isinstance(w, Tensor) for lw in layers for w in (lw.q_weight, lw.k_weight, lw.v_weight)):
            for lw in layers:
                rows = lw.q_weight.shape[0] + lw.k_weight.shape[0] + lw.v_weight.shape[0]
                bias = None if lw.q_bias is None else torch.empty(rows, dtype=lw.q_bias.dtype, device=dev)
                self._fused.append((torch.empty(rows, lw.q_weight.shape[1], dtype=lw.q_weight.dtype, device=dev),
                                    bias))
            self.refresh_weights()

    # ---- weights and adapters -------------------------------------------------------------------------

    @torch.inference_mode()
    def refresh_weights(self) -> None:
        """Copy the model's q/k/v weights into the fused matrices (after a park that may have changed them)."""
        for lw, (weight, bias) in zip(self.runner.weights.layers, self._fused):
            torch.cat((lw.q_weight, lw.k_weight, lw.v_weight), out=weight)
            if bias is not None:
                torch.cat((lw.q_bias, lw.k_bias, lw.v_bias), out=bias)  # type: ignore[arg-type]

    @torch.inference_mode()
    def adapters_changed(self) -> None:
        """Restack the loaded adapters' LoRA matrices; graphs that used the old ones are dropped."""
        self._graphs = {key: g for key, g in self._graphs.items() if not key[1]}
        r = self.runner
        loaded = sorted(r.loaded_adapters())
        self._lora, self._lora_args = None, []
        if not loaded:
            return
        # One rank for every adapter (the largest loaded, rounded up to 8) keeps the stacking a plain reshape.
        top = max(t.table.rank[s] for layer in r._lora for t in layer.values() for s in loaded)
        rank = max(8, -(-top // 8) * 8)
        rank = min(rank, r.max_rank)
        column_slot = torch.tensor(loaded, dtype=torch.long, device=r.device).repeat_interleave(rank)
        self._lora = _LoraLayout(loaded, rank, column_slot)
        idx = torch.tensor(loaded, dtype=torch.long, device=r.device)

        def stacked(name: str, layer: int) -> tuple[Tensor, Tensor]:
            t = r._lora[layer][name].table
            a = t.a.index_select(0, idx)[:, :rank].reshape(-1, t.a.shape[-1])
            # peft scales B(A(x)); folding the scale into B is the same product up to rounding.
            b = t.b.index_select(0, idx)[:, :, :rank] * t.scale.index_select(0, idx).to(t.b.dtype)[:, None, None]
            return a.contiguous(), b.permute(0, 2, 1).reshape(-1, t.b.shape[1]).contiguous()

        for i, lw in enumerate(r.weights.layers):
            wrap = {}
            for name, (base, bias) in {"o_proj": (lw.o_weight, None), "gate_proj": (lw.gate_weight, None),
                                       "up_proj": (lw.up_weight, None), "down_proj": (lw.down_weight, None)}.items():
                a, bt = stacked(name, i)
                wrap[name] = _StackedLora(base, bias, a, bt, self._masks, "one")
            out_args = (wrap["o_proj"], lw.post_norm, wrap["gate_proj"], wrap["up_proj"], wrap["down_proj"])
            if self._fused:
                parts = [stacked(n, i) for n in ("q_proj", "k_proj", "v_proj")]
                a = torch.cat([p[0] for p in parts])
                # Block-diagonal B: q's columns feed only q's outputs, and so on.
                bt = torch.block_diag(*[p[1] for p in parts])
                weight, bias = self._fused[i]
                qkv = _StackedLora(weight, bias, a, bt, self._masks, "three")
                in_args: tuple[Any, ...] = (lw.input_norm, qkv, None, None, None, None, None, lw.q_norm, lw.k_norm)
            else:
                q, k, v = (_StackedLora(w, b, *stacked(n, i), self._masks, "one")
                           for n, w, b in (("q_proj", lw.q_weight, lw.q_bias), ("k_proj", lw.k_weight, lw.k_bias),
                                           ("v_proj", lw.v_weight, lw.v_bias)))
                in_args = (lw.input_norm, q, None, k, None, v, None, lw.q_norm, lw.k_norm)
            self._lora_args.append((in_args, out_args))

    def _layer_args(self, i: int, lora: bool) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        if lora:
            return self._lora_args[i]
        lw = self.runner.weights.layers[i]
        if self._fused:
            weight, bias = self._fused[i]
            return (lw.input_norm, weight, bias, None, None, None, None, lw.q_norm, lw.k_norm), lw.attn_out_args()
        return lw.attn_in_args(), lw.attn_out_args()

    # ---- the step -------------------------------------------------------------------------------------

    def fits(self, chunks: list[SeqChunk]) -> bool:
        return len(chunks) <= self.max_batch and all(len(c.token_ids) == 1 and c.logits for c in chunks)

    @torch.inference_mode()
    def run(self, chunks: list[SeqChunk]) -> Tensor:
        n = len(chunks)
        bucket = next(b for b in self.buckets if b >= n)
        lora = self._lora is not None and any(c.adapter >= 0 for c in chunks)
        bs = self.runner.block_size
        host = self._host_rows
        host[:, :bucket] = 0
        host[_SLOT, :bucket] = self.scratch_slot
        host[_ADAPTER, :bucket] = -1
        width = 1
        for i, c in enumerate(chunks):
            p = c.start
            host[_IDS, i] = c.token_ids[0]
            host[_POS, i] = p
            host[_SLOT, i] = c.block_table[p // bs] * bs + p % bs
            host[_LEN, i] = p + 1
            host[_ADAPTER, i] = c.adapter
            width = max(width, p // bs + 1)
        tables = torch.zeros(bucket, width, dtype=torch.int32)
        for i, c in enumerate(chunks):
            k = c.start // bs + 1
            tables[i, :k] = torch.tensor(c.block_table[:k], dtype=torch.int32)
        # Beyond `width` a row's table keeps stale block ids; the kernel reads only blocks below the row's length.
        self.tables[:bucket, :width].copy_(tables, non_blocking=True)
        self.rows[:, :bucket].copy_(host[:, :bucket], non_blocking=True)
        if not self.use_graphs:
            return self._forward(bucket, lora)[:n]
        entry = self._graphs.get((bucket, lora))
        if entry is None:
            entry = self._capture(bucket, lora)
        entry[0].replay()
        return entry[1][:n]

    def _forward(self, b: int, lora: bool) -> Tensor:
        r = self.runner
        s, w = r.weights.shape, r.weights
        ids, pos, slot = self.rows[_IDS, :b], self.rows[_POS, :b], self.rows[_SLOT, :b]
        lengths = self.rows[_LEN, :b].to(torch.int32)
        tables = self.tables[:b]
        x = F.embedding(ids, w.embed)
        cos, sin = r.rope(pos)
        if lora:
            assert self._lora is not None
            one = (self.rows[_ADAPTER, :b, None] == self._lora.column_slot[None]).to(x.dtype)
            self._masks["one"] = one
            self._masks["three"] = one.repeat(1, 3)
        args = (s.rms_eps, s.num_heads, s.num_kv_heads, s.head_dim)
        scale = 1.0 / math.sqrt(s.head_dim)
        layer_in, layer_out = (attn_in, attn_out) if lora else (self._attn_in, self._attn_out)
        for i, kv in enumerate(r.kv):
            in_args, out_args = self._layer_args(i, lora)
            q, new_kv = layer_in(x, cos, sin, *args, *in_args)
            kv.index_copy_(1, slot, new_kv)
            attn = paged_decode_attention(q, kv[0], kv[1], tables, lengths, r.block_size, scale)
            x = layer_out(x, attn.reshape(b, -1), s.rms_eps, *out_args)
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
