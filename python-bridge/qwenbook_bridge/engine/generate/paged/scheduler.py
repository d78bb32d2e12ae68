"""The paged engine: one thread owns the model and decodes every submitted request over a shared paged cache.

A drop-in for `batching.scheduler.BatchScheduler` (same start/stop/submit/call_between_steps/exclusive/stats,
same `RequestHandle` events, the same thread: both subclass `batching.engine_thread.EngineThread`), built on
`blocks.BlockPool` (which cache blocks a sequence holds, and the prefix cache) and `runner.PagedRunner` (the
model math over the blocks). Each step:

1. admits waiting requests while blocks allow: the longest cached prefix of the prompt is reused
   (`BlockPool.match_prefix`), blocks for the rest are allocated;
2. gives every decoding row its next block when it crosses into one; when none is left, the newest row is
   preempted (its blocks freed, the request re-queued with its prompt and the reply so far, to be recomputed
   later, as vLLM does) instead of failing with out-of-memory;
3. runs one forward over every decoding row's token plus prefill chunks filling the rest of `max_step_tokens`,
   so a long prompt is prefilled over several steps while the other rows keep decoding;
4. samples each row with its own options, streams the text through the detokenizer and the stop filter,
   makes newly filled blocks findable by later requests (`BlockPool.commit`) and frees a finished or
   cancelled row's blocks at once.

Prefixes are cached per adapter (the pool's namespace is the row's adapter slot, None for the base model):
keys and values depend on the weights that computed them, so a prefix cached under one adapter is never found
under another. Removing an adapter, or a park in `exclusive()` (which may change the weights), forgets the
prefixes cached under the weights concerned.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwenbook_bridge.engine.errors import EngineError, InvalidOptionError
from qwenbook_bridge.engine.generate.batching.engine_thread import EngineThread, Row
from qwenbook_bridge.engine.generate.batching.requests import EventSink, RequestHandle
from qwenbook_bridge.engine.generate.batching.scheduler import BatchStats
from qwenbook_bridge.engine.generate.paged.blocks import BlockPool, CacheShape, NoFreeBlocks, cache_budget_bytes
from qwenbook_bridge.engine.generate.paged.runner import PagedRunner, SeqChunk
from qwenbook_bridge.engine.generate.sampling import SamplingParams, make_sampler
from qwenbook_bridge.engine.generate.streaming import IncrementalDetokenizer, StopStringFilter


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # rows decoding together; later arrivals wait in the queue
    # Tokens a step runs: each decoding row counts one, prefill chunks fill the rest. None: 2048 on a GPU, where
    # a prefill step costs about the same from 60 to 2048 tokens (launch-bound below that), so 32 arriving
    # prompts are prefilled in 2-3 steps instead of 10; 512 on a CPU, where a step's time grows with its tokens
    # and a long prompt would stall the decoding rows.
    max_step_tokens: int | None = None
    block_size: int = 16  # tokens a cache block holds
    # Share of the device the cache may take, as vLLM's gpu_memory_utilization (on the CPU: of free RAM).
    memory_utilization: float = 0.9
    num_blocks: int | None = None  # a fixed block count; None sizes the cache from memory_utilization
    prefix_caching: bool = True  # reuse the cached blocks of a prompt's leading tokens across requests
    context_length: int | None = None  # tokens a row may hold; None: the model config's max_position_embeddings
    rate_window_s: float = 5.0  # window over which the live tokens/s figure is averaged
    # LoRA adapters that can be loaded at once (add_adapter). Each slot takes max_lora_rank * (in + out) values
    # for every projection of every layer whether used or not (hundreds of MB for a 7B model at rank 64), so a
    # server that asks for none pays nothing.
    max_adapters: int = 0
    max_lora_rank: int = 64  # the largest LoRA rank add_adapter accepts
    # Compile the decode step's layers with torch.compile: fused element-wise kernels, on an H200 (7B shape) a
    # decode step of 5.2 ms instead of 6.4 at 1 row and 7.0 instead of 8.9 at 32, for a one-off ~9 s at the
    # first decode step (cached on disk by Inductor). None: on CUDA.
    compile: bool | None = None

    def validate(self) -> EngineConfig:
        for name, lo in (("max_batch_size", 1), ("max_step_tokens", 1), ("block_size", 1), ("max_adapters", 0),
                         ("max_lora_rank", 1)):
            value = getattr(self, name)
            if name == "max_step_tokens" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise InvalidOptionError(f"{name} must be an integer >= {lo}, got {value!r}")
        u = self.memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise InvalidOptionError(f"memory_utilization must be a fraction in (0, 1], e.g. 0.9, got {u!r}")
        if self.num_blocks is not None and (isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int)
                                            or self.num_blocks < 1):
            raise InvalidOptionError(f"num_blocks must be a positive integer or None, got {self.num_blocks!r}")
        if self.context_length is not None and (isinstance(self.context_length, bool)
                                                or not isinstance(self.context_length, int) or self.context_length < 2):
            raise InvalidOptionError(f"context_length must be an integer >= 2 or None, got {self.context_length!r}")
        return self


@dataclass(frozen=True)
class EngineStats(BatchStats):
    # BatchStats' fields first, so callers of either engine read the same names; then the paged cache.
    blocks_total: int
    blocks_used: int  # blocks held by running rows (cached prefixes nobody holds are free to reuse)
    block_size: int
    cache_bytes: int
    prefix_hit_rate: float  # of the prompt tokens looked up in the prefix cache, the share found there
    prefix_hit_tokens: int
    preemptions: int  # rows whose blocks were taken back to let older rows go on (recomputed later)


@dataclass(eq=False)
class _Seq(Row):
    """A request and its sequence: `tokens` is the prompt and the reply so far; the first `computed` of them
    have their keys and values in `blocks`, and the first `committed` blocks are in the prefix cache."""

    adapter: int  # the runner's adapter slot, -1 for the base model
    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    committed: int = 0
    order: int = 0  # admission order: the largest is the newest row, the first preempted


class PagedEngine(EngineThread[_Seq, _Seq]):
    """Owns the model on one thread and decodes every submitted request over one paged key/value cache."""

    _thread_name = "qwenbook-paged-engine"
    config: EngineConfig

    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig | None = None,
                 eos_token_ids: frozenset[int] | None = None) -> None:
        super().__init__(model, tokenizer, (config or EngineConfig()).validate(), eos_token_ids, "the paged engine")
        bs = self.config.block_size
        num_blocks = self.config.num_blocks or self._blocks_from_memory(self._text_config)
        self.runner = PagedRunner(model, num_blocks, bs, max_adapters=self.config.max_adapters,
                                  max_rank=self.config.max_lora_rank, max_batch=self.config.max_batch_size,
                                  max_seq_len=self.context_length, compile=self._compile())
        self.pool = BlockPool(num_blocks, bs, prefix_caching=self.config.prefix_caching)
        self.max_step_tokens = self.config.max_step_tokens or (2048 if self.device.type == "cuda" else 512)
        self._adapters: dict[str, int] = {}
        self._order = itertools.count()
        self._preemptions = 0

    def _compile(self) -> bool:
        return self.device.type == "cuda" if self.config.compile is None else bool(self.config.compile)

    def _blocks_from_memory(self, mcfg: Any) -> int:
        """Blocks in `memory_utilization` of the device, capped at what the batch can use: every row at
        full context (more would only hold old prefixes)."""
        bs = self.config.block_size
        heads = int(mcfg.num_attention_heads)
        shape = CacheShape(num_layers=int(mcfg.num_hidden_layers),
                           num_kv_heads=int(getattr(mcfg, "num_key_value_heads", None) or heads),
                           head_dim=int(getattr(mcfg, "head_dim", None) or mcfg.hidden_size // heads),
                           dtype=next(self.model.parameters()).dtype, block_size=bs)
        # The weights are loaded already, so what they take is out of the free memory the budget starts from.
        budget = cache_budget_bytes(self.device, float(self.config.memory_utilization),
                                    minimum=shape.bytes_per_block())
        useful = self.config.max_batch_size * math.ceil(self.context_length / bs)
        return int(min(budget // shape.bytes_per_block(), useful))

    # ---- public API ------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: EventSink | None = None,
               adapter: str | None = None) -> RequestHandle:
        """Queue a request; it joins the batch when blocks allow. `sink` is called on the engine thread, so it
        must be quick and must not block (e.g. `loop.call_soon_threadsafe(q.put_nowait, ev)`). `adapter` names
        one added with `add_adapter`; None decodes with the base model."""
        self._check_prompt(prompt_ids)
        n = len(prompt_ids)
        slot = -1
        if adapter is not None:
            if adapter not in self._adapters:
                known = ", ".join(sorted(self._adapters)) or "none"
                raise InvalidOptionError(f"no adapter named {adapter!r} is loaded in this engine (loaded: {known}): "
                                         "add it with add_adapter(name, folder) first, or pass adapter=None")
            slot = self._adapters[adapter]
        limit = min(params.max_tokens, self.context_length - n)
        # The last sampled token is never fed back, so the cache holds at most prompt + limit - 1 tokens.
        needed = self._blocks_for(n + limit - 1)
        if needed > self.pool.num_blocks:
            bs = self.pool.block_size
            raise InvalidOptionError(
                f"this request needs {needed} cache blocks ({n} prompt tokens + {limit} to generate, {bs} tokens a "
                f"block) but the whole cache holds {self.pool.num_blocks} blocks ({self.pool.num_blocks * bs} "
                "tokens): lower max_tokens or shorten the prompt, or give the engine a larger cache "
                "(a higher memory_utilization, or more num_blocks)")
        if not self.running:
            raise EngineError("the paged engine is not running: call start() first")
        handle = RequestHandle(list(prompt_ids), params, sink)
        seq = _Seq(handle, IncrementalDetokenizer(self.tokenizer), StopStringFilter(params.stop),
                   make_sampler(params, self.device), torch.tensor(handle.prompt_ids, dtype=torch.long),
                   limit, adapter=slot, tokens=list(handle.prompt_ids))
        with self._wake:
            self._waiting.append(seq)
            self._wake.notify_all()
        return handle

    def holds(self, tokens: int) -> bool:
        """Whether one request of `tokens` cached tokens fits the whole cache."""
        return self._blocks_for(tokens) <= self.pool.num_blocks

    def add_adapter(self, name: str, folder: Path | str) -> None:
        """Load a peft LoRA folder into a free adapter slot under `name`, for `submit(..., adapter=name)`.
        Runs between two steps; the rows already decoding go on."""
        if not isinstance(name, str) or not name:
            raise InvalidOptionError(f"an adapter name must be a non-empty string, got {name!r}")

        def add() -> None:
            if name in self._adapters:
                raise InvalidOptionError(f"an adapter named {name!r} is already loaded: remove_adapter({name!r}) "
                                         "first, or choose another name")
            if not self.config.max_adapters:
                raise InvalidOptionError("this engine has no adapter slots: build it with "
                                         "EngineConfig(max_adapters=N) to serve up to N LoRA adapters")
            free = sorted(set(range(self.config.max_adapters)) - set(self._adapters.values()))
            if not free:
                raise InvalidOptionError(
                    f"all {self.config.max_adapters} adapter slots are taken ({', '.join(sorted(self._adapters))}): "
                    "remove one, or build the engine with a larger EngineConfig.max_adapters")
            self.runner.load_adapter(free[0], folder)
            self.pool.forget(free[0])  # nothing should be cached there; a slot's old adapter never leaks
            self._adapters[name] = free[0]

        self.call_between_steps(add).result()

    def remove_adapter(self, name: str) -> None:
        """Unload adapter `name`; refused while a request uses it (wait for those requests or cancel them)."""
        def remove() -> None:
            if name not in self._adapters:
                raise InvalidOptionError(f"no adapter named {name!r} is loaded in this engine")
            slot = self._adapters[name]
            with self._wake:
                users = sum(1 for s in itertools.chain(self._rows, self._waiting) if s.adapter == slot)
            if users:
                raise EngineError(f"adapter {name!r} is in use by {users} request(s): wait for them to finish or "
                                  "cancel them before removing it")
            self.runner.unload_adapter(slot)
            self.pool.forget(slot)
            del self._adapters[name]

        self.call_between_steps(remove).result()

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def stats(self) -> EngineStats:
        prefix = self.pool.stats()
        bs = self.pool.block_size
        return EngineStats(
            self.running, len(self._rows), len(self._waiting), self._steps, self._peak, self._tokens,
            self._rate(), self._last_error,
            blocks_total=self.pool.num_blocks, blocks_used=self.pool.used_count,
            block_size=bs, cache_bytes=self.runner.shape.bytes_per_block() * self.pool.num_blocks,
            prefix_hit_rate=round(prefix.hit_rate, 4),
            prefix_hit_tokens=prefix.hit_tokens, preemptions=self._preemptions)

    # ---- the engine thread -----------------------------------------------------------------------

    def _park_if_asked(self) -> bool:
        parked = super()._park_if_asked()
        if parked and not self._stopping:
            # The parked block may have changed the weights (a merge, a quantization), so every cached prefix
            # may be stale. Rows decoding across the park keep their own cache, as under BatchScheduler; their
            # blocks are not cached once they let go.
            for namespace in [None, *self._adapters.values()]:
                self.pool.forget(namespace)
            self.runner.refresh_weights()
        return parked

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if not self._rows:
            return
        self._reserve_decode_blocks()
        if not self._rows:
            return
        budget = self.max_step_tokens
        chunks: list[SeqChunk] = []
        owners: list[_Seq] = []
        # Decoding rows first, each one token (they never wait for a prefill), then prefill chunks in
        # admission order within what is left of the step's tokens.
        decoding = [s for s in self._rows if len(s.tokens) - s.computed == 1]
        prefilling = [s for s in self._rows if len(s.tokens) - s.computed > 1]
        for s in decoding:
            budget -= 1
            chunks.append(self._chunk(s, 1))
            owners.append(s)
        for s in prefilling:
            if budget <= 0:
                break
            n = min(len(s.tokens) - s.computed, budget)
            budget -= n
            chunks.append(self._chunk(s, n))
            owners.append(s)
        logits = self.runner.step(chunks)
        sampled: list[_Seq] = []
        for s, chunk in zip(owners, chunks):
            s.computed += len(chunk.token_ids)
            self._commit_filled(s)
            if chunk.logits:
                sampled.append(s)
        self._steps += 1
        self._peak = max(self._peak, len(self._rows))
        if sampled:
            tokens = self._sample(logits, sampled)
            self._count_tokens(len(tokens))
            for s, token in zip(sampled, tokens):
                self._advance(s, token)
        self._drop_finished()

    def _chunk(self, s: _Seq, n: int) -> SeqChunk:
        end = s.computed + n
        return SeqChunk(token_ids=s.tokens[s.computed:end], start=s.computed,
                        block_table=s.blocks[:self._blocks_for(end)], adapter=s.adapter,
                        logits=end == len(s.tokens))

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.pool.block_size)

    @staticmethod
    def _namespace(s: _Seq) -> int | None:
        """Where the row's prefixes are cached: under its adapter, or None for the base model."""
        return s.adapter if s.adapter >= 0 else None

    def _admit(self) -> None:
        while len(self._rows) < self.config.max_batch_size:
            with self._wake:
                if not self._waiting:
                    return
                s = self._waiting[0]
            # Keep one block per running row in hand, so admitting does not at once preempt a decoding row.
            # The first check, with the most a prefix hit could save, spares the prefix cache a lookup (and its
            # statistics a count) every step a request cannot start anyway.
            reserve = len(self._rows)
            total = self._blocks_for(len(s.tokens))
            if not self.pool.can_allocate(total - (len(s.tokens) - 1) // self.pool.block_size + reserve):
                return
            matched = self.pool.match_prefix(s.tokens, namespace=self._namespace(s))
            needed = total - len(matched)
            if not self.pool.can_allocate(needed + reserve):
                self.pool.release(matched)
                return
            with self._wake:
                self._waiting.popleft()
            s.blocks = matched + self.pool.allocate(needed)
            s.committed = len(matched)
            s.computed = len(matched) * self.pool.block_size
            s.order = next(self._order)
            self._rows.append(s)

    def _reserve_decode_blocks(self) -> None:
        """Give each decoding row the block its next token goes into; when none is free, preempt the newest
        row (possibly the one asking) until one is."""
        for s in list(self._rows):
            if s.finished or s not in self._rows or s.computed < len(s.blocks) * self.pool.block_size:
                continue
            while True:
                try:
                    s.blocks.extend(self.pool.allocate(1))
                    break
                except NoFreeBlocks:
                    victim = max(self._rows, key=lambda r: r.order)
                    self._preempt(victim)
                    if victim is s:
                        break

    def _preempt(self, s: _Seq) -> None:
        self.pool.release(s.blocks)
        s.blocks, s.computed, s.committed = [], 0, 0
        self._rows.remove(s)
        with self._wake:
            self._waiting.appendleft(s)  # first in line again: it was admitted before everything waiting
        self._preemptions += 1

    def _commit_filled(self, s: _Seq) -> None:
        """Make the blocks this step filled findable by later prompts that start with the same tokens."""
        if not self.config.prefix_caching:
            return
        bs = self.pool.block_size
        while (s.committed + 1) * bs <= s.computed:
            i = s.committed
            self.pool.commit(s.blocks[i], s.tokens[i * bs:(i + 1) * bs], s.blocks[i - 1] if i else None,
                             namespace=self._namespace(s))
            s.committed += 1

    def _advance(self, s: _Seq, token: int) -> bool:
        s.tokens.append(token)  # the next step feeds it to the model (or a recompute after preemption does)
        return super()._advance(s, token)

    def _drop_cancelled(self) -> None:
        self._finish_cancelled_rows()
        self._drop_finished()
        with self._wake:
            gone = [s for s in self._waiting if s.handle.cancelled]
            for s in gone:
                self._waiting.remove(s)
        for s in gone:
            self._finish(s, "cancelled")

    def _drop_finished(self) -> None:
        for s in self._rows:
            if s.finished:
                self.pool.release(s.blocks)
                s.blocks = []
        self._rows = [s for s in self._rows if not s.finished]

    def _clear_rows(self) -> None:
        self._drop_finished()

    def _cancel_waiting(self, item: _Seq) -> None:
        self._finish(item, "cancelled")
