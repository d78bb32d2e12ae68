"""The chat engine: one `PagedEngine` per resident model for notebook chat, so notebooks chatting with one model
decode in one batch, a conversation's next turn reuses its cached prefix, and LoRA adapters are applied per row
from adapter slots instead of peft's layers (which would slow every request down, even with adapters off).

`ChatEngines.lease(loaded, adapter)` gives a request the model's engine and the name its adapter has there, or
None when the request must take the old path (engine/generate/generation.py's loops with peft's layers):
a model the paged runner cannot read (another architecture, spread over devices), an adapter it cannot compute
(DoRA, modules_to_save, ...), a rank beyond the engine's while other requests are running on it, every adapter
slot in use. Each such choice is logged once with its reason.

An adapter's slot is loaded from the folder the model's `AdapterManager` loaded it from, and read again when
that changes: another folder under the name, a new stamp in the `AdapterRegistry` (the adapter was loaded
again), or new weights in the folder (a training run wrote it). Slots not in use are evicted least recently
used first.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenbook_bridge.engine.errors import CancelledError, EngineError, first_sentences
from qwenbook_bridge.engine.files.save import ProgressFn
from qwenbook_bridge.engine.generate.fast_ops import reading_base_weights
from qwenbook_bridge.engine.generate.paged.blocks import CacheShape, cache_budget_bytes
from qwenbook_bridge.engine.generate.paged.scheduler import EngineConfig, PagedEngine
from qwenbook_bridge.engine.llama_cpp.engine import LlamaCppEngine, LlamaEngineConfig, cpu_engine_choice
from qwenbook_bridge.engine.models.adapter_registry import AdapterRegistry, Stamp, folder_stamp
from qwenbook_bridge.engine.models.adapters import AdapterError, read_adapter_config
from qwenbook_bridge.engine.models.loading import LoadedModel, free_memory

log = logging.getLogger(__name__)
ChatEngine = PagedEngine | LlamaCppEngine


@dataclass(frozen=True)
class ChatEngineConfig:
    # Chat is a few notebooks at a time, not a server's load: the cache holds `max_batch_size` rows of
    # `tokens_per_row` tokens (capped at the model's context), e.g. 8 x 8192 tokens = 3.5 GiB for a 7B Qwen2.5
    # in bf16, instead of the share of the device the HTTP server takes. More rows than that queue, a longer
    # conversation preempts or takes the old path; the rest of the device stays for training and serving.
    max_batch_size: int = 8
    tokens_per_row: int = 8192
    block_size: int = 16
    # Prompt tokens a step prefills beside the decoding rows; None: the engine's default for the device (2048 on
    # a GPU, where a step costs about the same from 60 to 2048 tokens; 512 on a CPU).
    max_step_tokens: int | None = None
    # Never more than this share of the device (CUDA) or of free RAM (CPU) in all, whatever the rule above gives.
    memory_utilization: float = 0.9
    # Adapter slots: each costs max_lora_rank * (in + out) values per projection per layer (~5 MB per rank for
    # a 7B model), so a handful, with a rank fitted to the adapters loaded, keeps them cheap.
    max_adapters: int = 4
    min_lora_rank: int = 16


def enabled() -> bool:
    """`QWENBOOK_CHAT_ENGINE=0` sends chat to the old loops (fast decoder or transformers' forward), e.g. to
    compare speeds; anything else (the default) uses the chat engine."""
    return os.environ.get("QWENBOOK_CHAT_ENGINE", "1").strip() != "0"


@dataclass
class _Slot:
    """One adapter in the engine: the folder and stamps it was read with, and the requests using it."""

    engine_name: str
    key: tuple[str, Stamp, Stamp]  # (folder, the registry's stamp, the folder's stamp now)
    users: int = 0


@dataclass
class _ModelEngine:
    model: Any
    engine: ChatEngine
    max_rank: int
    slots: collections.OrderedDict[str, _Slot] = field(default_factory=collections.OrderedDict)  # LRU order
    retired: list[_Slot] = field(default_factory=list)  # replaced while in use; removed when free
    users: int = 0

    def loaded_slots(self) -> int:
        return len(self.slots) + len(self.retired)


class Lease:
    """A request's hold on the chat engine (and its adapter's slot) until `release()` or the with-block ends."""

    def __init__(self, owner: ChatEngines, entry: _ModelEngine, slot: _Slot | None) -> None:
        self._owner, self._entry, self._slot = owner, entry, slot
        self.engine: ChatEngine = entry.engine
        self.adapter: str | None = None if slot is None else slot.engine_name
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._owner._release(self._entry, self._slot)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class ChatEngines:
    """Each resident model's chat engine, made on its first chat and stopped when the model goes away."""

    def __init__(self, adapters: AdapterRegistry, config: ChatEngineConfig | None = None) -> None:
        self.adapters = adapters
        self.config = config or ChatEngineConfig()
        self._lock = threading.RLock()
        # Signalled when a lease ends or an exclusive block does: exclusive() waits for the leases to end, new
        # leases wait for exclusive() blocks to end.
        self._changed = threading.Condition(self._lock)
        self._blocked: dict[str, int] = {}  # model id -> exclusive() blocks entered (maybe nested)
        self._entries: dict[str, _ModelEngine] = {}
        # Models (by id, with the object to tell a reload apart) the engine cannot run, and adapter folders it
        # cannot compute: asked about once, then the old path without another try.
        self._refused: dict[str, Any] = {}
        self._unsupported: set[tuple[str, Stamp]] = set()
        self._no_llama: dict[str, Any] = {}  # models llama.cpp cannot run (by id, with the model object)
        self._names = itertools.count(1)

    # ---- requests ----------------------------------------------------------------------------------------

    def lease(self, loaded: LoadedModel, adapter: str | None = None) -> Lease | None:
        """The model's chat engine for one request with `adapter` (None: the base model), or None for the old
        path. Release the lease when the request has ended."""
        if not enabled() or loaded.model is None:
            return None
        wanted = self._adapter_key(loaded, adapter) if adapter is not None else None
        if adapter is not None and wanted is None:
            return None  # not loaded: the old path's adapter_scope refuses it in its own words
        with self._changed:
            while self._blocked.get(loaded.model_id):
                self._changed.wait()
            if self._refused.get(loaded.model_id) is loaded.model:
                return None
            if wanted is not None and (wanted[0], wanted[2]) in self._unsupported:
                return None
            entry = self._current(loaded)
            rank = self._rank(wanted[0]) if wanted is not None else 0
            if entry is not None and wanted is not None and (not entry.engine.config.max_adapters
                                                              or rank > entry.max_rank):
                if entry.users:
                    log.info("chat with adapter %r takes the peft path: the chat engine of %s has %s and is busy, "
                             "so it cannot be rebuilt now", adapter, loaded.model_id,
                             "no adapter slots" if not entry.engine.config.max_adapters
                             else f"max_lora_rank {entry.max_rank} < rank {rank}")
                    return None
                self._drop(loaded.model_id)
                entry = None
            if entry is None:
                entry = self._build(loaded, rank, with_adapters=wanted is not None or self._has_adapters(loaded),
                                    base_only=wanted is None)
                if entry is None:
                    return None
            slot = None
            if wanted is not None:
                assert adapter is not None
                slot = self._slot_for(entry, adapter, wanted)
                if slot is None:
                    return None
                slot.users += 1
            entry.users += 1
            return Lease(self, entry, slot)

    def _release(self, entry: _ModelEngine, slot: _Slot | None) -> None:
        # A retired slot is unloaded by the next request that needs a slot, not here: unloading waits for the
        # engine, which a training run may hold parked, and the reply must not wait for that.
        with self._changed:
            entry.users -= 1
            if slot is not None:
                slot.users -= 1
            self._changed.notify_all()

    # ---- the model's lifetime ----------------------------------------------------------------------------

    @contextmanager
    def exclusive(self, model_id: str, free_cache: bool = False) -> Iterator[None]:
        """Hold the model's chat while the block changes the model (training, export, adapters): chats already
        running finish first (as when the worker ran one request at a time), later ones wait for the block to
        end, and the engine is parked meanwhile. It forgets its cached prefixes afterwards; adapter slots whose
        folders changed are read again on their next use. With `free_cache` the engine is stopped instead and
        its cache given back for the block (a training run's activations), to be made again by the next chat."""
        with self._changed:
            self._blocked[model_id] = self._blocked.get(model_id, 0) + 1
        try:
            with self._changed:
                while (entry := self._entries.get(model_id)) is not None and entry.users:
                    self._changed.wait()
                if free_cache and entry is not None:
                    self._drop(model_id)
                    entry = None
            if entry is None or not entry.engine.running:
                if free_cache:
                    free_memory()
                yield
            else:
                with entry.engine.exclusive():
                    yield
                if isinstance(entry.engine, LlamaCppEngine):
                    # Its GGUF copy holds the weights from before the block, which may have changed them: the
                    # next chat makes the engine again, from the cached copy when the weights are the same.
                    with self._changed:
                        if self._entries.get(model_id) is entry:
                            self._drop(model_id)
        finally:
            with self._changed:
                self._blocked[model_id] -= 1
                if not self._blocked[model_id]:
                    del self._blocked[model_id]
                self._changed.notify_all()

    def forget(self, model_id: str) -> None:
        """The model is being unloaded (or replaced): stop its engine, which holds the weights and its cache."""
        with self._lock:
            self._drop(model_id)
            self._refused.pop(model_id, None)
            self._no_llama.pop(model_id, None)

    def close(self) -> None:
        with self._lock:
            for model_id in list(self._entries):
                self._drop(model_id)

    def engine(self, model_id: str) -> ChatEngine | None:
        """The model's chat engine if one is running (for stats)."""
        with self._lock:
            entry = self._entries.get(model_id)
            return entry.engine if entry is not None else None

    def running_engines(self) -> list[tuple[str, ChatEngine]]:
        """(model id, engine) of each chat engine running now, for status and the memory telemetry.

        Read without the lock: it is held while an engine is built or stopped, which takes seconds on a GPU,
        and status must answer at once. Copying the table is one step under the GIL; an engine that stops
        right after is reported once more, with the figures it stopped with."""
        entries = dict(self._entries)
        return [(model_id, entry.engine) for model_id, entry in entries.items() if entry.engine.running]

    # ---- internals ---------------------------------------------------------------------------------------

    def _current(self, loaded: LoadedModel) -> _ModelEngine | None:
        entry = self._entries.get(loaded.model_id)
        if entry is not None and (entry.model is not loaded.model or not entry.engine.running):
            self._drop(loaded.model_id)  # the model was loaded again, or the engine's thread ended
            entry = None
        return entry

    def _drop(self, model_id: str) -> None:
        entry = self._entries.pop(model_id, None)
        if entry is not None:
            entry.engine.stop()

    def _build(self, loaded: LoadedModel, rank: int, with_adapters: bool, base_only: bool = False
               ) -> _ModelEngine | None:
        cfg = self.config
        if base_only:
            llama = self._build_llama(loaded)
            if llama is not None:
                return llama
        max_rank = _rank_bucket(max([rank, cfg.min_lora_rank, *self._loaded_ranks(loaded)]))
        context = int(loaded.info.get("context_length") or 0) or None
        import torch

        try:
            # The engine applies adapters from its slots, so it reads the base weights under peft's layers.
            with reading_base_weights():
                engine = PagedEngine(loaded.model, loaded.tokenizer, EngineConfig(
                    max_batch_size=cfg.max_batch_size, max_step_tokens=cfg.max_step_tokens, block_size=cfg.block_size,
                    num_blocks=self._num_blocks(loaded, context), context_length=context,
                    max_adapters=cfg.max_adapters if with_adapters else 0, max_lora_rank=max_rank),
                    loaded.eos_token_ids)
        except (TypeError, ValueError, EngineError, torch.OutOfMemoryError) as exc:
            # No room for the cache now (another engine, a training run) may change: a later chat tries again.
            # A layout the paged runner does not read (another architecture, several devices) will not.
            lasting = not isinstance(exc, (EngineError, torch.OutOfMemoryError))
            log.info("chat with %s takes the old decode loops: the chat engine cannot run it%s (%s)",
                     loaded.model_id, "" if lasting else " now", first_sentences(exc))
            if lasting:
                self._refused[loaded.model_id] = loaded.model
            else:
                free_memory()
            return None
        engine.start()
        entry = self._entries[loaded.model_id] = _ModelEngine(loaded.model, engine, max_rank)
        return entry

    def prepare(self, loaded: LoadedModel, progress: ProgressFn | None = None) -> str | None:
        """Make the model's chat engine now, when it is llama.cpp's (a model on the CPU): its GGUF copy is written
        at load time, with the load's progress, not at the first chat. Says which engine the chat will use."""
        with self._changed:
            if self._current(loaded) is None and self._build_llama(loaded, progress) is None:
                return None
            entry = self._entries.get(loaded.model_id)
            return "llama.cpp" if entry is not None and isinstance(entry.engine, LlamaCppEngine) else None

    def _build_llama(self, loaded: LoadedModel, progress: ProgressFn | None = None) -> _ModelEngine | None:
        """The llama.cpp engine for a model on the CPU, or None where it does not apply (another device, the
        PyTorch engine asked for) or cannot run it (no library, an architecture the GGUF writer does not know):
        those take the PyTorch engine, with the reason logged once."""
        from qwenbook_bridge.engine.llama_cpp.gguf_cache import gguf_for

        device = next(loaded.model.parameters()).device
        if device.type != "cpu" or cpu_engine_choice() != "llama.cpp" or self._no_llama.get(loaded.model_id) is \
                loaded.model:
            return None
        context = int(loaded.info.get("context_length") or 0) or None
        try:
            gguf = gguf_for(loaded.model, loaded.tokenizer, progress)
            engine = LlamaCppEngine(loaded.model, loaded.tokenizer, gguf,
                                    LlamaEngineConfig(tokens_per_row=self.config.tokens_per_row,
                                                      context_length=context), loaded.eos_token_ids)
        except CancelledError:
            raise  # a load cancelled while the copy was written: the model stays, a later chat tries again
        except Exception as exc:  # no library, an architecture the writer does not know, no disk space, ...
            # Chat still works, on PyTorch: a fast path that cannot start must not cost the user the model.
            log.warning("chat with %s runs on PyTorch, not llama.cpp: %s", loaded.model_id, first_sentences(exc))
            self._no_llama[loaded.model_id] = loaded.model
            return None
        engine.start()
        entry = self._entries[loaded.model_id] = _ModelEngine(loaded.model, engine, 0)
        return entry

    def _num_blocks(self, loaded: LoadedModel, context: int | None) -> int:
        """The cache for `max_batch_size` rows of min(context, tokens_per_row) tokens, within the memory cap."""
        import torch

        cfg = self.config
        mcfg = loaded.model.config
        mcfg = mcfg.get_text_config(decoder=True) if hasattr(mcfg, "get_text_config") else mcfg
        per_row = min(context or int(getattr(mcfg, "max_position_embeddings", 0) or cfg.tokens_per_row),
                      cfg.tokens_per_row)
        wanted = cfg.max_batch_size * math.ceil(per_row / cfg.block_size)
        heads = int(mcfg.num_attention_heads)
        shape = CacheShape(num_layers=int(mcfg.num_hidden_layers),
                           num_kv_heads=int(getattr(mcfg, "num_key_value_heads", None) or heads),
                           head_dim=int(getattr(mcfg, "head_dim", None) or mcfg.hidden_size // heads),
                           dtype=next(loaded.model.parameters()).dtype, block_size=cfg.block_size)
        device = next(loaded.model.parameters()).device
        budget = cache_budget_bytes(device if device.type != "meta" else torch.device("cpu"),
                                    cfg.memory_utilization, minimum=shape.bytes_per_block())
        return int(min(wanted, budget // shape.bytes_per_block()))

    def _has_adapters(self, loaded: LoadedModel) -> bool:
        return self.adapters.has_adapters(loaded.model_id)

    def _loaded_ranks(self, loaded: LoadedModel) -> list[int]:
        manager = self.adapters.existing(loaded.model_id)
        if manager is None:
            return []
        return [self._rank(info.path) for info in manager.list()]

    @staticmethod
    def _rank(folder: str) -> int:
        """The largest LoRA rank in the folder's config (r, and any per-module rank_pattern)."""
        try:
            config = read_adapter_config(folder)
        except AdapterError:
            return 0
        ranks = [config.get("r") or 0, *(config.get("rank_pattern") or {}).values()]
        return max(int(r) for r in ranks if isinstance(r, (int, float)))

    def _adapter_key(self, loaded: LoadedModel, name: str) -> tuple[str, Stamp, Stamp] | None:
        manager = self.adapters.existing(loaded.model_id)
        if manager is None or manager.model is not loaded.model:
            return None
        info = next((i for i in manager.list() if i.name == name), None)
        if info is None:
            return None
        return info.path, self.adapters.stamp(loaded.model_id, name), folder_stamp(Path(info.path))

    def _slot_for(self, entry: _ModelEngine, name: str, key: tuple[str, Stamp, Stamp]) -> _Slot | None:
        """The engine's slot holding adapter `name` as `key` says, loaded (or read again) if need be."""
        slot = entry.slots.get(name)
        if slot is not None:
            if slot.key == key:
                entry.slots.move_to_end(name)
                return slot
            # Another folder, a reload or new weights in the folder: the slot's weights are stale. Requests
            # still using it finish on the weights they started with; it goes once they have.
            del entry.slots[name]
            entry.retired.append(slot)
            if not slot.users:
                self._remove(entry, slot)
        for old in [s for s in entry.retired if not s.users]:  # removals refused earlier (see _remove)
            self._remove(entry, old)
        while entry.loaded_slots() >= entry.engine.config.max_adapters:
            idle = next((n for n, s in entry.slots.items() if not s.users), None)
            if idle is None:
                log.info("chat with adapter %r takes the peft path: all %d adapter slots of the chat engine are in "
                         "use", name, entry.engine.config.max_adapters)
                return None
            victim = entry.slots.pop(idle)
            entry.retired.append(victim)
            if not self._remove(entry, victim):
                return None
        slot = _Slot(f"{name}#{next(self._names)}", key)
        try:
            entry.engine.add_adapter(slot.engine_name, key[0])
        except AdapterError as exc:  # DoRA, biases, other modules...: peft computes it, the slots do not
            log.info("chat with adapter %r takes the peft path: %s", name, exc)
            self._unsupported.add((key[0], key[2]))
            return None
        except EngineError as exc:  # no free slot after all (see _remove), the engine stopped
            log.info("chat with adapter %r takes the peft path: %s", name, exc)
            return None
        entry.slots[name] = slot
        return slot

    @staticmethod
    def _remove(entry: _ModelEngine, slot: _Slot) -> bool:
        """Unload a retired slot. A request that has just ended may still hold its row until the engine's next
        step (the engine drops cancelled rows there), so a refusal leaves it retired, to be tried again."""
        try:
            entry.engine.remove_adapter(slot.engine_name)
        except EngineError as exc:
            log.debug("the chat engine's slot %s stays loaded for now: %s", slot.engine_name, exc)
            return False
        entry.retired.remove(slot)
        return True


def _rank_bucket(rank: int) -> int:
    """The next power of two: a rank a little above the largest loaded should not force a rebuild."""
    return 1 << max(0, int(rank) - 1).bit_length()
