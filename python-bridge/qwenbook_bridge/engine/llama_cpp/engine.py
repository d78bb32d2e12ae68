"""The CPU chat engine on llama.cpp: the paged engine's interface (submit, stream events, cancel, exclusive,
stats) with llama.cpp computing the model from a GGUF copy of its weights (gguf_cache.py).

Why: on a CPU, llama.cpp's kernels read q8_0/q4_0 weights at the memory's speed and its graph has no Python
between the layers; the same 0.5B model decodes several times faster there than in PyTorch (bench/cpu.py).
Sampling, end tokens, stop strings and the detokenizer stay ours (`EngineThread`): llama.cpp returns logits
and nothing else, so a reply is sampled by the same code on every path.

Each of `rows` requests decodes in a llama.cpp sequence of its own, all of them in one batch per step, with
prefill chunks filling the rest of a step's tokens as in the paged engine. A sequence keeps its tokens cached
after its request ends, and a new request takes the free sequence sharing the longest prefix with its prompt,
so a conversation's next turn computes only what is new.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwenbook_bridge.engine.errors import EngineError, InvalidOptionError
from qwenbook_bridge.engine.generate.batching.engine_thread import EngineThread, Row
from qwenbook_bridge.engine.generate.batching.requests import EventSink, RequestHandle
from qwenbook_bridge.engine.generate.paged.scheduler import EngineStats
from qwenbook_bridge.engine.generate.sampling import SamplingParams, make_sampler
from qwenbook_bridge.engine.generate.streaming import IncrementalDetokenizer, StopStringFilter
from qwenbook_bridge.engine.llama_cpp.context import Chunk, LlamaContext, cache_bytes_per_token


@dataclass(frozen=True)
class LlamaEngineConfig:
    max_batch_size: int = 4  # sequences decoding together; each holds tokens_per_row cached tokens
    tokens_per_row: int = 8192
    max_step_tokens: int = 512  # tokens one llama_decode runs: decoding rows first, prefill chunks after
    threads: int | None = None  # None: torch's thread count (OMP_NUM_THREADS, else the cores available)
    context_length: int | None = None
    rate_window_s: float = 5.0
    # Read by callers that ask any chat engine for adapter slots; llama.cpp serves the base weights only.
    max_adapters: int = 0
    num_blocks: int | None = 0  # a fixed cache (rows x tokens): status shows no memory share for it


@dataclass(eq=False)
class _Seq(Row):
    tokens: list[int]  # the prompt and the reply so far
    slot: int = -1
    computed: int = 0  # leading tokens whose keys and values are in the slot


class LlamaCppEngine(EngineThread[_Seq, _Seq]):
    _thread_name = "qwenbook-llama-cpp-engine"
    config: LlamaEngineConfig

    def __init__(self, model: Any, tokenizer: Any, gguf: Path, config: LlamaEngineConfig | None = None,
                 eos_token_ids: frozenset[int] | None = None) -> None:
        config = config or LlamaEngineConfig()
        super().__init__(model, tokenizer, config, eos_token_ids, "the llama.cpp engine")
        if self.device.type != "cpu":
            raise EngineError(f"the llama.cpp engine runs models on the CPU; this one is on {self.device}")
        self.tokens_per_row = min(self.context_length, config.tokens_per_row)
        self.context_length = self.tokens_per_row
        threads = config.threads or max(1, torch.get_num_threads())
        self.gguf = gguf
        exact = gguf.name.endswith("-f32.gguf")  # gguf_cache.py names each copy by its tensor type
        self.ctx = LlamaContext(gguf, config.max_batch_size, self.tokens_per_row, config.max_step_tokens, threads,
                                exact=exact)
        mcfg = self._text_config
        heads = int(mcfg.num_attention_heads)
        self._bytes_per_token = cache_bytes_per_token(
            int(mcfg.num_hidden_layers), int(getattr(mcfg, "num_key_value_heads", None) or heads),
            int(getattr(mcfg, "head_dim", None) or mcfg.hidden_size // heads), exact)
        # What each sequence holds cached, and which are free (in least recently used order).
        self._cached: list[list[int]] = [[] for _ in range(config.max_batch_size)]
        self._free: list[int] = list(range(config.max_batch_size))
        self._looked_up = 0
        self._hits = 0

    # ---- public API ------------------------------------------------------------------------------

    def holds(self, tokens: int) -> bool:
        """Whether one request of `tokens` tokens (prompt and reply) fits a sequence's cache."""
        return tokens <= self.tokens_per_row

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: EventSink | None = None,
               adapter: str | None = None) -> RequestHandle:
        if adapter is not None:
            raise InvalidOptionError(f"the llama.cpp engine runs the base weights only, not adapter {adapter!r}")
        self._check_prompt(prompt_ids)
        if not self.running:
            raise EngineError("the llama.cpp engine is not running: call start() first")
        limit = min(params.max_tokens, self.context_length - len(prompt_ids))
        handle = RequestHandle(list(prompt_ids), params, sink)
        seq = _Seq(handle, IncrementalDetokenizer(self.tokenizer), StopStringFilter(params.stop),
                   make_sampler(params, self.device), torch.tensor(handle.prompt_ids, dtype=torch.long),
                   limit, tokens=list(handle.prompt_ids))
        with self._wake:
            self._waiting.append(seq)
            self._wake.notify_all()
        return handle

    def adapters(self) -> list[str]:
        return []

    def prompt_logits(self, ids: list[int]) -> torch.Tensor:
        """The logits after `ids` (a quality check against another path), computed in the least recently used
        free sequence between two steps, which then holds `ids` for a later request to reuse."""
        def run() -> torch.Tensor:
            if not self._free:
                raise EngineError("every llama.cpp sequence is decoding a request: try again when one ends")
            if not 0 < len(ids) <= self.tokens_per_row:
                raise InvalidOptionError(f"give 1 to {self.tokens_per_row} token ids, got {len(ids)}")
            slot = self._free[0]
            self.ctx.forget(slot)
            self._cached[slot] = []
            step = self.ctx.max_step_tokens
            for start in range(0, len(ids), step):
                chunk = ids[start:start + step]
                logits = self.ctx.decode([Chunk(slot, chunk, start, start + len(chunk) == len(ids))])
                self._cached[slot] = list(ids[:start + len(chunk)])
            return logits[0]

        return self.call_between_steps(run).result()

    def stats(self) -> EngineStats:
        used = sum(s.computed for s in self._rows)
        total = self.config.max_batch_size * self.tokens_per_row
        return EngineStats(
            self.running, len(self._rows), len(self._waiting), self._steps, self._peak, self._tokens,
            self._rate(), self._last_error,
            blocks_total=total, blocks_used=used, block_size=1, cache_bytes=total * self._bytes_per_token,
            prefix_hit_rate=round(self._hits / self._looked_up, 4) if self._looked_up else 0.0,
            prefix_hit_tokens=self._hits, preemptions=0)

    def stop(self, timeout: float | None = 30.0) -> None:
        super().stop(timeout)
        if not self.running:
            self.ctx.close()

    # ---- the engine thread -----------------------------------------------------------------------

    def _park_if_asked(self) -> bool:
        parked = super()._park_if_asked()
        if parked and not self._stopping:
            # The block may have changed the weights; the GGUF copy is the old ones. Whoever owns the engine
            # replaces it (chat_engine.py); until then nothing cached under the old weights is reused.
            for i, cached in enumerate(self._cached):
                if i in self._free and cached:
                    self.ctx.forget(i)
                    self._cached[i] = []
        return parked

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if not self._rows:
            return
        budget = self.ctx.max_step_tokens
        chunks: list[Chunk] = []
        owners: list[_Seq] = []
        for s in [s for s in self._rows if len(s.tokens) - s.computed == 1]:
            budget -= 1
            chunks.append(Chunk(s.slot, s.tokens[-1:], s.computed, True))
            owners.append(s)
        for s in [s for s in self._rows if len(s.tokens) - s.computed > 1]:
            if budget <= 0:
                break
            n = min(len(s.tokens) - s.computed, budget)
            budget -= n
            end = s.computed + n
            chunks.append(Chunk(s.slot, s.tokens[s.computed:end], s.computed, end == len(s.tokens)))
            owners.append(s)
        logits = self.ctx.decode(chunks)
        sampled: list[_Seq] = []
        for s, chunk in zip(owners, chunks):
            s.computed += len(chunk.token_ids)
            self._cached[s.slot] = s.tokens[:s.computed]
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

    def _admit(self) -> None:
        while self._free:
            with self._wake:
                if not self._waiting:
                    return
                s = self._waiting.popleft()
            # The free sequence sharing the longest prefix; ties go to the least recently used.
            best, common = self._free[0], -1
            for slot in self._free:
                n = _common_prefix(self._cached[slot], s.tokens)
                if n > common:
                    best, common = slot, n
            self._free.remove(best)
            common = min(common, len(s.tokens) - 1)  # the last prompt token is always run, for its logits
            self.ctx.forget(best, common)
            self._cached[best] = s.tokens[:common]
            self._looked_up += len(s.tokens)
            self._hits += common
            s.slot, s.computed = best, common
            self._rows.append(s)

    def _advance(self, s: _Seq, token: int) -> bool:
        s.tokens.append(token)
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
            if s.finished and s.slot >= 0:
                self._free.append(s.slot)  # last in line: the most recently used
                s.slot = -1
        self._rows = [s for s in self._rows if not s.finished]

    def _clear_rows(self) -> None:
        self._drop_finished()

    def _cancel_waiting(self, item: _Seq) -> None:
        self._finish(item, "cancelled")

    def _fail_all(self, exc: Exception) -> None:
        # A failed decode may leave part of a batch in the cache: what the failed rows' sequences hold is unknown.
        slots = [s.slot for s in self._rows if s.slot >= 0]
        super()._fail_all(exc)
        for slot in slots:
            self.ctx.forget(slot)
            self._cached[slot] = []


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def cpu_engine_choice() -> str:
    """`QWENBOOK_CPU_ENGINE`: "llama.cpp" (the default) runs CPU chat on llama.cpp where it can; "pytorch" keeps
    it on the paged engine in PyTorch (e.g. to compare the two)."""
    value = os.environ.get("QWENBOOK_CPU_ENGINE", "llama.cpp").strip().lower()
    if value not in ("llama.cpp", "pytorch"):
        raise InvalidOptionError(f"QWENBOOK_CPU_ENGINE={value!r}: use llama.cpp or pytorch")
    return value


