"""Fast decoding for Qwen2/Qwen3 models: a static KV cache and one CUDA graph per decode step.

Batch-1 decode of a 7B model is bound by reading the weights once per token; transformers' eager loop
spends most of each step launching hundreds of small kernels from Python instead. `FastDecoder` keeps
everything a step needs in fixed device buffers (KV cache, current token, positions, sampling settings,
token history), so the whole step — all layers, sampling, the bookkeeping for the next step — is one
graph replay with no host work in between. The host only reads tokens back to stream them, one step
behind the device so the GPU never waits for Python.

Graphs are captured lazily per attended span (multiples of 256 slots, coarser for long contexts), so a
step at position 600 attends over 768 cache slots rather than all of `max_seq_len`. On CPU (or with
`cuda_graphs=False`) the same functions run eagerly over exactly the filled part of the cache: same
tokens, slower.

    decoder = FastDecoder(model, max_seq_len=4096)             # batch_size=1
    tokens = decoder.generate([prompt_ids], max_new_tokens=256)[0]
    for step in decoder.stream([prompt_ids], 256, SamplingParams(temperature=0.7, top_p=0.9, seed=1)):
        ...  # step[0] is the next token id (None once that row has finished)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qwenbook_bridge.engine.generate.fast_ops import (FusedQKV, attn_in, attn_out, decode_layer, extract_weights,
    final_logits, rope_tables, sdpa_decode_attention)
from qwenbook_bridge.engine.generate.sampling import MAX_EOS_IDS, SamplingParams, SeededDraws, sample_tokens
# Cache slots are allocated, and attention spans are rounded, in multiples of this (a multiple of the compiled
# attention's 64-slot chunk), so a step at position 600 attends over 768 slots, not the whole cache.
SPAN_STEP = 256
# Up to this many (row, KV head) pairs the compiled step uses split-K attention; beyond, the fused kernel
# already has enough blocks to fill the GPU and is faster.
SPLIT_K_MAX_PAIRS = 32


# The options the fast decoder looks at are temperature, top_k, top_p, greedy and seed (sampling.py); it takes
# the number of new tokens and the stop ids as arguments of its own.
GREEDY = SamplingParams(greedy=True)


def allow_recompiles() -> None:
    # Each (batch size, attended-length bucket) pair is a shape the compiled layer may be specialised for;
    # the default limit of 8 would silently drop a long-running worker back to uncompiled layers.
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < 64:
            setattr(config, name, 64)


def _span(needed: int, limit: int) -> int:
    """Attended cache length for a step needing `needed` slots: fine steps for short contexts, coarser for
    long ones, so the number of captured graphs stays small (about 30 for a 32k context)."""
    step = SPAN_STEP if needed <= 4096 else 4 * SPAN_STEP if needed <= 16384 else 16 * SPAN_STEP
    return min(-(-needed // step) * step, limit)


class FastDecoder:
    """Decodes up to `batch_size` sequences at once from a loaded Qwen2/Qwen3 causal LM.

    The decoder reads the model's weight tensors in place, so it follows in-place weight changes, but build
    a new one after replacing modules (merging adapters, quantizing). With `fuse_qkv` (the default on CUDA)
    it keeps the q/k/v projections stacked in one extra matrix per layer (about 6% of a 7B model's weights),
    refreshed from the model at the start of every request. `compile=True` runs each decoder layer through
    torch.compile (a one-off cost of seconds per shape, cached on disk by Inductor); its attention is split-K
    over the cache for small batches and the fused attention kernel for large ones (`split_k_attention`
    overrides the choice). One decoder serves one request (or one batch) at a time.
    """

    def __init__(self, model: Any, max_seq_len: int, batch_size: int = 1, *, cuda_graphs: bool | None = None,
                 compile: bool = False, fuse_qkv: bool | None = None, split_k_attention: bool | None = None,
                 prefill_chunk: int = 2048) -> None:
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.weights = extract_weights(model)
        layers = self.weights.layers
        plain_qkv = FusedQKV.applies(self.weights)
        every = [self.weights.lm_head, *(w for lw in layers for w in (*lw.attn_out_args(), lw.q_weight,
                                                                        lw.k_weight, lw.v_weight))]
        if compile and any(isinstance(w, torch.nn.Module) for w in every):
            # Without the Triton kernels their forward picks a packed kernel in Python (and checks it once).
            raise ValueError("compile=True takes int8/int4 layers only where their Triton kernels run (a CUDA "
                             "device with Triton installed); use cuda_graphs alone here (the default on CUDA)")
        shape = self.weights.shape
        self.shape = shape
        self.device = self.weights.embed.device
        self.dtype = self.weights.embed.dtype
        on_cuda = self.device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device; it is on {self.device}")
        self.use_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        self.compiled = compile
        self.max_seq_len = max_seq_len
        self.cache_len = -(-max_seq_len // SPAN_STEP) * SPAN_STEP
        self.split_k = (batch_size * shape.num_kv_heads <= SPLIT_K_MAX_PAIRS if split_k_attention is None
                        else split_k_attention)
        self.batch_size = batch_size
        self.prefill_chunk = prefill_chunk
        self._layer: Callable[..., Any] = decode_layer
        self._final: Callable[..., Any] = final_logits
        if compile:
            allow_recompiles()
            self._layer = torch.compile(decode_layer, fullgraph=True)
            self._final = torch.compile(final_logits, fullgraph=True)
        dev, b = self.device, batch_size
        self._fused = FusedQKV(self.weights) if (on_cuda if fuse_qkv is None else fuse_qkv) and plain_qkv else None
        with torch.no_grad():
            self.cos, self.sin = rope_tables(model, max_seq_len, dev)
            # Zeros, not empty: masked slots still enter the attention product as 0 * value, and 0 * NaN is NaN.
            self.kv = [torch.zeros(2, b, shape.num_kv_heads, self.cache_len, shape.head_dim, dtype=self.dtype,
                                   device=dev) for _ in range(shape.num_layers)]
        self.rows = torch.arange(b, device=dev)
        self.kv_heads = torch.arange(shape.num_kv_heads, device=dev)
        self.slots = torch.arange(self.cache_len, device=dev)
        self.tokens = torch.zeros(b, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, dtype=torch.long, device=dev)
        # One spare column: the step that feeds the last slot still records the token it produced.
        self.history = torch.zeros(b, max_seq_len + 1, dtype=torch.long, device=dev)
        self.finished = torch.ones(b, dtype=torch.bool, device=dev)
        self.eos_ids = torch.full((MAX_EOS_IDS,), -1, dtype=torch.long, device=dev)
        self.pad_id = torch.zeros((), dtype=torch.long, device=dev)
        self.temperature = torch.zeros(b, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(b, dtype=torch.long, device=dev)
        self.top_p = torch.ones(b, dtype=torch.float32, device=dev)
        self.min_p = torch.zeros(b, dtype=torch.float32, device=dev)
        # The request's seed and draw count: buffers a captured graph reads and advances; reset per request.
        self._draws = SeededDraws.for_request(GREEDY, dev)
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._pool: Any = None
        self._ring: list[Tensor] | None = None
        self._host_position = 0  # the largest position of a current token, known without asking the device
        self.busy = threading.Lock()  # held by whoever is decoding with it (engine/generate/generation.py)

    def _refresh_fused(self) -> None:
        if self._fused is not None:
            self._fused.refresh()

    def _in_args(self, i: int) -> tuple[Tensor | None, ...]:
        return self.weights.layers[i].attn_in_args() if self._fused is None else self._fused.in_args(i)

    # ---- the device-side step -------------------------------------------------------------------------

    def _step(self, attend_len: int, sample: bool) -> None:
        """Feed the current tokens, write their KV, and leave the next tokens (and positions) in the buffers."""
        s, w = self.shape, self.weights
        x = F.embedding(self.tokens, w.embed)
        cos, sin = self.cos[self.positions], self.sin[self.positions]
        # Flat cache slot of (row, kv head, position) in kv viewed as [2, rows * kv_heads * cache_len, head_dim].
        slot = ((self.rows[:, None] * s.num_kv_heads + self.kv_heads[None]) * self.cache_len
                + self.positions[:, None]).reshape(-1)
        visible = self.slots[:attend_len][None] <= self.positions[:, None]
        args = (s.rms_eps, s.num_heads, s.num_kv_heads, s.head_dim)
        for i, kv in enumerate(self.kv):
            if self.compiled:
                x = self._layer(x, cos, sin, kv, slot, visible, self.split_k, *args, *self._in_args(i),
                                *w.layers[i].attn_out_args())
                continue
            q, new_kv = attn_in(x, cos, sin, *args, *self._in_args(i))
            kv.view(2, -1, s.head_dim).index_copy_(1, slot, new_kv.reshape(2, -1, s.head_dim))
            out = sdpa_decode_attention(q, kv[0, :, :, :attend_len], kv[1, :, :, :attend_len], visible)
            x = attn_out(x, out, s.rms_eps, *w.layers[i].attn_out_args())
        logits = self._final(x, w.final_norm, w.lm_head, s.rms_eps)
        nxt = sample_tokens(logits, self.temperature, self.top_k, self.top_p, self._draws, min_p=self.min_p) \
            if sample else logits.argmax(-1)
        self._accept(nxt)
        self.positions += 1
        self.history[self.rows, self.positions] = self.tokens

    def _accept(self, nxt: Tensor) -> None:
        nxt = torch.where(self.finished, self.pad_id, nxt)
        self.finished |= (nxt[:, None] == self.eos_ids[None]).any(-1)
        self.tokens.copy_(nxt)

    def _run_step(self, sample: bool) -> None:
        needed = self._host_position + 1
        if not self.use_graphs:
            # The compiled attention works on whole chunks; eager attention can take the exact length.
            self._step(_span(needed, self.cache_len) if self.compiled else needed, sample)
            return
        attend_len = _span(needed, self.cache_len)
        graph = self._graphs.get((attend_len, sample))
        if graph is None:
            graph = self._capture(attend_len, sample)
        graph.replay()

    def _capture(self, attend_len: int, sample: bool) -> torch.cuda.CUDAGraph:
        # Warm-up runs compile and pick kernels; they also advance the state and the draw count (a seeded
        # request must draw the same numbers whether or not it triggered a capture), so put them back.
        state = (self.tokens, self.positions, self.finished, self._draws.step)
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(attend_len, sample)
                for buf, old in zip(state, saved):
                    buf.copy_(old)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(attend_len, sample)
        self._graphs[(attend_len, sample)] = graph
        return graph

    # ---- prefill --------------------------------------------------------------------------------------

    def _prefill_row(self, row: int, ids: Tensor) -> Tensor:
        """Run a prompt [n] into cache row `row` in chunks; return the last position's logits [V]."""
        s, w = self.shape, self.weights
        n = ids.shape[0]
        x = ids
        for start in range(0, n, self.prefill_chunk):
            end = min(n, start + self.prefill_chunk)
            x = F.embedding(ids[start:end], w.embed)
            cos, sin = self.cos[start:end], self.sin[start:end]
            causal = None if start == 0 else self.slots[:end][None] <= self.slots[start:end][:, None]
            for i, kv in enumerate(self.kv):
                q, new_kv = attn_in(x, cos, sin, s.rms_eps, s.num_heads, s.num_kv_heads, s.head_dim, *self._in_args(i))
                kv[:, row, :, start:end] = new_kv.permute(0, 2, 1, 3)
                keys, values = kv[0, row:row + 1, :, :end], kv[1, row:row + 1, :, :end]
                qh = q.transpose(0, 1)[None]
                out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=causal, is_causal=causal is None,
                                                     enable_gqa=True)
                x = attn_out(x, out[0].transpose(0, 1).reshape(end - start, s.num_heads * s.head_dim), s.rms_eps,
                             *w.layers[i].attn_out_args())
        return final_logits(x[-1:], w.final_norm, w.lm_head, s.rms_eps)[0]

    def _start(self, prompts: Sequence[Sequence[int]] | Tensor, max_new_tokens: int, sampling: SamplingParams,
               eos_token_ids: Sequence[int], pad_token_id: int) -> list[int]:
        rows = [list(map(int, p)) for p in (prompts.tolist() if isinstance(prompts, Tensor) else prompts)]
        if not rows or len(rows) > self.batch_size:
            raise ValueError(f"expected 1 to {self.batch_size} prompts (this decoder's batch_size), got {len(rows)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        longest = max(len(r) for r in rows)
        if min(len(r) for r in rows) == 0:
            raise ValueError("every prompt needs at least one token")
        if longest + max_new_tokens - 1 > self.max_seq_len:
            raise ValueError(
                f"a {longest}-token prompt plus {max_new_tokens} new tokens needs {longest + max_new_tokens - 1} "
                f"cache slots, but this decoder has max_seq_len={self.max_seq_len}: build it with a larger "
                "max_seq_len or ask for fewer tokens")
        vocab = self.shape.vocab_size
        if any(not 0 <= t < vocab for r in rows for t in r):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(eos_token_ids) > MAX_EOS_IDS:
            raise ValueError(f"at most {MAX_EOS_IDS} stop token ids are supported, got {len(eos_token_ids)}")
        self._draws.reset(sampling)
        dev, b = self.device, self.batch_size
        self._refresh_fused()
        self.eos_ids.fill_(-1)
        if eos_token_ids:
            self.eos_ids[:len(eos_token_ids)] = torch.tensor(list(eos_token_ids), dtype=torch.long, device=dev)
        self.pad_id.fill_(pad_token_id)
        self.temperature.fill_(0.0 if sampling.is_greedy else sampling.temperature)
        self.top_k.fill_(min(sampling.top_k, 2**31))
        self.top_p.fill_(sampling.top_p)
        self.min_p.fill_(sampling.min_p)
        logits = torch.zeros(b, vocab, dtype=torch.float32, device=dev)
        lengths = torch.zeros(b, dtype=torch.long)
        self.history.zero_()
        for i, r in enumerate(rows):
            ids = torch.tensor(r, dtype=torch.long, device=dev)
            logits[i] = self._prefill_row(i, ids)
            self.history[i, :len(r)] = ids
            lengths[i] = len(r)
        self.positions.copy_(lengths.to(dev))
        self.finished.copy_(self.rows >= len(rows))
        first = logits.argmax(-1) if sampling.is_greedy \
            else sample_tokens(logits, self.temperature, self.top_k, self.top_p, self._draws, min_p=self.min_p)
        self._accept(first)
        self.history[self.rows, self.positions] = self.tokens
        self._host_position = longest
        return [len(r) for r in rows]

    # ---- public loops ---------------------------------------------------------------------------------

    @torch.no_grad()
    def stream(self, prompts: Sequence[Sequence[int]] | Tensor, max_new_tokens: int,
               sampling: SamplingParams = GREEDY, eos_token_ids: Sequence[int] = (),
               pad_token_id: int = 0) -> Iterator[list[int | None]]:
        """Yield one list per step with the next token of each prompt (None for a row that already stopped).
        A row stops after yielding a stop token; the loop ends when every row has stopped or after
        max_new_tokens tokens. Closing the iterator early stops decoding."""
        n = len(self._start(prompts, max_new_tokens, sampling, eos_token_ids, pad_token_id))
        stops = set(int(t) for t in eos_token_ids)
        done = [False] * n
        pipelined = self.device.type == "cuda"
        if self._ring is None:
            # Pinned, so the copy of each step's tokens is a real async DMA the host can wait on by event.
            self._ring = [torch.empty(self.batch_size, dtype=torch.long, pin_memory=pipelined) for _ in range(2)]
        ring = self._ring
        events = [torch.cuda.Event() if pipelined else None for _ in range(2)]

        def issue(k: int) -> None:
            ring[k % 2].copy_(self.tokens, non_blocking=pipelined)
            ev = events[k % 2]
            if ev is not None:
                ev.record()

        def collect(k: int) -> list[int | None]:
            ev = events[k % 2]
            if ev is not None:
                ev.synchronize()
            values = ring[k % 2][:n].tolist()
            out: list[int | None] = []
            for i, t in enumerate(values):
                out.append(None if done[i] else t)
                done[i] = done[i] or t in stops
            return out

        issue(0)
        for k in range(1, max_new_tokens):
            # Queue step k before reading step k-1's tokens, so the device is busy while Python streams.
            self._run_step(sample=not sampling.is_greedy)
            self._host_position += 1
            issue(k)
            step = collect(k - 1)
            yield step
            if all(done):
                return
        yield collect(max_new_tokens - 1)

    def generate(self, prompts: Sequence[Sequence[int]] | Tensor, max_new_tokens: int,
                 sampling: SamplingParams = GREEDY, eos_token_ids: Sequence[int] = (),
                 pad_token_id: int = 0) -> list[list[int]]:
        """The new tokens of each prompt, a stop token included (as transformers' generate returns them)."""
        rows: list[list[int]] | None = None
        for step in self.stream(prompts, max_new_tokens, sampling, eos_token_ids, pad_token_id):
            if rows is None:
                rows = [[] for _ in step]
            for row, t in zip(rows, step):
                if t is not None:
                    row.append(t)
        assert rows is not None
        return rows

    @torch.no_grad()
    def greedy_logits(self, prompt: Sequence[int]) -> Tensor:
        """The last position's logits [V] after prefilling one prompt into row 0 (for checks against HF)."""
        ids = torch.tensor(list(prompt), dtype=torch.long, device=self.device)
        self._refresh_fused()
        if not 0 < ids.shape[0] <= self.max_seq_len:
            raise ValueError(f"the prompt must have 1 to {self.max_seq_len} tokens, got {ids.shape[0]}")
        return self._prefill_row(0, ids)
