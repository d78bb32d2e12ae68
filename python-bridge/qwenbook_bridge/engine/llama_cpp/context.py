"""One GGUF model in llama.cpp with one context of `rows` sequences: decode a batch mixing sequences (each a run
of tokens at its positions), read the logits of the tokens asked for, drop a sequence's cached tail. Every call
comes from the one engine thread that owns it."""

from __future__ import annotations


from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwenbook_bridge.engine.errors import EngineError
from qwenbook_bridge.engine.llama_cpp.library import library


_GGML_TYPE_F32 = 0
_FLASH_ATTN_DISABLED = 0


@dataclass(frozen=True)
class Chunk:
    """Tokens of one sequence at positions start..start+len-1; `logits`: return the last one's logits."""

    seq: int
    token_ids: list[int]
    start: int
    logits: bool


class LlamaContext:
    def __init__(self, gguf: Path, rows: int, tokens_per_row: int, max_step_tokens: int, threads: int,
                 exact: bool = False) -> None:
        self.lib = lib = library()
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        self._model = lib.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self._model:
            raise EngineError(f"llama.cpp could not load {gguf} (its log above says why)")
        cp = lib.llama_context_default_params()
        # Each sequence gets its own share of the cache (kv_unified off): rows x tokens_per_row cells in all.
        cp.n_ctx = rows * tokens_per_row
        cp.n_seq_max = rows
        cp.n_batch = cp.n_ubatch = max_step_tokens
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        if exact:
            # An f32 model's keys and values cached in f32 too, and attention without flash attention's f16
            # steps: what PyTorch computes in fp32, up to the order of sums (twice the cache's memory).
            cp.type_k = cp.type_v = _GGML_TYPE_F32
            cp.flash_attn_type = _FLASH_ATTN_DISABLED
        self._ctx = lib.llama_init_from_model(self._model, cp)
        if not self._ctx:
            lib.llama_model_free(self._model)
            raise EngineError(f"llama.cpp could not make a context of {cp.n_ctx} tokens for {gguf}")
        self.rows, self.tokens_per_row = rows, tokens_per_row
        self.max_step_tokens, self.threads = max_step_tokens, threads
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model))
        self._memory = lib.llama_get_memory(self._ctx)
        self._batch = lib.llama_batch_init(max_step_tokens, 0, 1)

    def decode(self, chunks: list[Chunk]) -> torch.Tensor:
        """Run the chunks in one llama_decode; the logits of each chunk with `logits`, in order, as float32."""
        if not self._ctx:
            raise EngineError("this llama.cpp context was closed (its engine stopped)")
        b = self._batch
        i = 0
        out: list[int] = []
        for c in chunks:
            for j, t in enumerate(c.token_ids):
                b.token[i] = t
                b.pos[i] = c.start + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = c.seq
                last = c.logits and j == len(c.token_ids) - 1
                b.logits[i] = 1 if last else 0
                if last:
                    out.append(i)
                i += 1
        if i > self.max_step_tokens:
            raise EngineError(f"a step of {i} tokens exceeds the context's batch of {self.max_step_tokens}")
        b.n_tokens = i
        code = self.lib.llama_decode(self._ctx, b)
        if code != 0:
            raise EngineError(f"llama_decode failed with code {code}"
                              + (" (no room left in the key/value cache)" if code == 1 else ""))
        logits = torch.empty((len(out), self.n_vocab), dtype=torch.float32)
        for k, idx in enumerate(out):
            ptr = self.lib.llama_get_logits_ith(self._ctx, idx)
            logits[k] = torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))
        return logits

    def forget(self, seq: int, start: int = 0) -> None:
        """Drop sequence `seq`'s cached tokens from position `start` on."""
        if self._ctx:
            self.lib.llama_memory_seq_rm(self._memory, seq, start, -1)

    def close(self) -> None:
        if self._ctx:
            self.lib.llama_batch_free(self._batch)
            self.lib.llama_free(self._ctx)
            self.lib.llama_model_free(self._model)
            self._ctx = self._model = None

    def __del__(self) -> None:  # an engine dropped without stop() still gives the memory back
        try:
            self.close()
        except Exception:
            pass


def cache_bytes_per_token(n_layers: int, kv_heads: int, head_dim: int, exact: bool) -> int:
    """What one cached token takes: f32 keys and values for an exact (f32) context, else llama.cpp's f16."""
    return n_layers * 2 * kv_heads * head_dim * (4 if exact else 2)



