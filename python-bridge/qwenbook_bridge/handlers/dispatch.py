"""What each request does, apart from sockets and framing (the server does those).

Control handlers take a request's content and return its reply content at once. Job handlers take a
`JobContext` (the request, a cancel flag and a way to emit events), run on the job thread, and return the
reply content; an exception becomes an error reply.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qwenbook_bridge import PROTOCOL_VERSION, __version__
from qwenbook_bridge.engine import (CancelledError, LoadOptions, LoadProgress,
    ModelRegistry, SamplingParams, available_devices, memory_snapshot)
from qwenbook_bridge.engine.files.save import ProgressEvent
from qwenbook_bridge.engine.generate.chat_engine import ChatEngines
from qwenbook_bridge.engine.generate.generation import EngineDeclined, generate
from qwenbook_bridge.engine.models.adapter_registry import AdapterRegistry
from qwenbook_bridge.handlers.adapters import AdapterHandlers
from qwenbook_bridge.handlers.context import JobContext, JobHandler, ProtocolVersionMismatch, Sessions
from qwenbook_bridge.handlers.engine_caches import cache_items
from qwenbook_bridge.handlers.export import ExportHandlers
from qwenbook_bridge.handlers.serve import ServeHandlers
from qwenbook_bridge.handlers.train import BACKGROUND, TrainHandlers
from qwenbook_bridge.handlers.paths import model_source, with_calibration_path
from qwenbook_bridge.protocol import major

# Request fields that map one-to-one onto option dataclasses; absent fields keep the dataclass defaults.
_LOAD_FIELDS = ("dtype", "device", "devices", "revision", "attn_implementation", "local_files_only", "quant")
_GENERATE_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "greedy", "stop", "seed")

log = logging.getLogger("qwenbook.worker")


def _pick(content: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {k: content[k] for k in names if k in content}


class Handlers:
    def __init__(self, default_device: str = "auto", root: Path | None = None) -> None:
        self.registry = ModelRegistry(default_device)
        self.sessions = Sessions()
        self.started = time.monotonic()
        self.root = root  # with --root, every client path must resolve inside it (handlers/paths.py)
        self.export = ExportHandlers(self.registry, root=root)
        self.serve = ServeHandlers(self.registry, root=root)
        # Chat, export and training all see a model's adapters through this one registry.
        self.adapters = AdapterRegistry()
        # Notebook chat decodes on one paged engine per model (engine/generate/chat_engine.py).
        self.chat = ChatEngines(self.adapters)
        self.adapter_jobs = AdapterHandlers(self.registry, self.adapters, exclusive=self.exclusive, root=root)
        self.train = TrainHandlers(self.registry, self.adapters, exclusive=self._exclusive_for_training, root=root)
        self.background = BACKGROUND  # request types the server runs on a thread of their own
        # Request types the server runs on a thread of their own without taking their model from other work:
        # chats from several notebooks run at once, so the chat engine batches them. Whatever else touches a
        # model holds its lock (_holding_model), as does a chat on the old path, which switches peft's layers.
        self.concurrent = frozenset({"generate"})
        self._model_locks: dict[str, threading.RLock] = {}
        self._locks_lock = threading.Lock()

    # ------------------------------------------------------------ control (main thread)

    def hello(self, content: dict[str, Any], session: str | None = None) -> dict[str, Any]:
        import torch
        import transformers

        theirs = content["protocol_version"]
        if major(theirs) != major(PROTOCOL_VERSION):
            raise ProtocolVersionMismatch(
                f"{content.get('client') or 'the client'} speaks protocol {theirs} but this worker (qwenbook_bridge "
                f"{__version__}, pid {os.getpid()}) speaks {PROTOCOL_VERSION}; stop the old worker "
                "(npx qwenbook worker stop) so a matching one is started")
        if session is not None:
            self.sessions.hello(session, content.get("pid"), content.get("host"))
        return {
            "status": "ok",
            "protocol_version": PROTOCOL_VERSION,
            "worker_version": __version__,
            "pid": os.getpid(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "devices": available_devices(),
        }

    def status(self, running: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "status": "ok",
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "models": self.registry.infos(),
            "running": running,
            "memory": memory_snapshot(),
            "devices": available_devices(),
            "engines": self.engine_caches(),
        }

    def engine_caches(self) -> list[dict[str, Any]]:
        """The key/value cache of each live paged engine (chat engines, then servers'), for status and the
        worker's `gpu` broadcast."""
        return cache_items(self.chat.running_engines(), self.serve.paged_engines())

    # ------------------------------------------------------------ jobs (job thread)

    def load(self, job: JobContext) -> dict[str, Any]:
        if job.cancel.is_set():
            raise CancelledError("the load was cancelled before it started")
        content = dict(job.request.content)
        content["model"] = model_source(content["model"], self.root)
        if "quant" in content:
            content["quant"] = with_calibration_path(content["quant"], self.root)
        options = LoadOptions(**_pick(content, _LOAD_FIELDS))

        ready: list[LoadProgress] = []

        def progress(p: LoadProgress) -> None:
            # Stop between stages (and between download chunks); a model that finished loading is kept.
            if job.cancel.is_set() and p.stage != "ready":
                raise CancelledError(f"loading {content['model']} was cancelled ({p.stage} stage)")
            if p.stage == "ready":
                ready.append(p)  # the last stage, sent once the CPU chat's copy below is made too
                return
            job.emit("load_progress", p.to_dict())

        loaded, already = self.registry.load(content["model"], options, progress=progress, user=job.request.session)
        if loaded.device.type == "cpu":
            # CPU chat runs on llama.cpp from a GGUF copy of the weights: written now (once per weights, cached),
            # under the load's progress line, so the first chat does not wait for it.
            def copy_progress(e: ProgressEvent) -> None:
                progress(LoadProgress("cpu_chat", "writing the weights' GGUF copy that CPU chat runs on (llama.cpp)",
                                      e.fraction, e.bytes_done or None, e.bytes_total or None))

            self.chat.prepare(loaded, copy_progress)
        for p in ready:
            job.emit("load_progress", p.to_dict())
        return {"status": "ok", "model": dict(loaded.info), "already_loaded": already}

    def unload(self, job: JobContext) -> dict[str, Any]:
        model_id, me = job.request.content["model_id"], job.request.session
        others = 0
        for user in self.registry.users(model_id) - {me}:
            if self.sessions.alive(user):
                others += 1
            else:
                self.registry.detach(model_id, user)  # a kernel that is gone no longer holds the model
        if others and not job.request.content.get("force", False):
            # Another notebook still uses the model: drop only this session's use of it.
            self.registry.detach(model_id, me)
            return {"status": "ok", "unloaded": False, "other_users": others}
        self.serve.stop_model(model_id)  # a server would keep the weights alive
        self.chat.forget(model_id)  # so would the chat engine
        self.adapters.forget(model_id)  # so would its adapters
        return {"status": "ok", "unloaded": self.registry.unload(model_id), "other_users": others}

    def generate(self, job: JobContext) -> dict[str, Any]:
        content = job.request.content
        loaded = self.registry.get(content["model_id"])
        # A bad field is refused here, before the model is touched, under the notebook API's name for it.
        options = SamplingParams(**_pick(content, _GENERATE_FIELDS))
        on_token = None
        if content.get("stream", True):
            def on_token(delta: Any) -> None:
                event: dict[str, Any] = {"text": delta.text, "token_ids": delta.token_ids, "index": delta.index}
                if delta.reasoning:
                    event["reasoning"] = delta.reasoning
                if delta.tool_calls:
                    event["tool_calls"] = delta.tool_calls
                job.emit("token", event)
        chat_kw = {"tools": content.get("tools"), "thinking": content.get("thinking")}
        adapter = content.get("adapter")
        lease = self.chat.lease(loaded, adapter)
        if lease is not None:
            # The chat engine reads the weights and applies the adapter from its own slot, changing nothing in
            # the model, so an HTTP server of the same model keeps decoding meanwhile.
            try:
                with lease:
                    result = generate(loaded, content["messages"], options, on_token=on_token, cancel=job.cancel,
                                      engine=lease.engine, adapter=lease.adapter, **chat_kw)
                return {"status": "ok", **result.to_dict()}
            except EngineDeclined as e:
                log.info("chat with %s takes the old decode loops: %s", loaded.model_id, e)
        # The old path switches the adapter on in peft's layers, which would change what a server running the
        # model's own forward (the padded scheduler) computes: that server is parked meanwhile, and other work on
        # the model (another such chat, adapters going on or off, an export) waits for the model's lock.
        with self._model_lock(loaded.model_id), self.serve.exclusive(loaded.model_id), \
                self.adapters.adapter_scope(loaded, adapter):
            result = generate(loaded, content["messages"], options, on_token=on_token, cancel=job.cancel, **chat_kw)
        return {"status": "ok", **result.to_dict()}

    @contextmanager
    def exclusive(self, model_id: str) -> Iterator[None]:
        """Park every engine decoding with `model_id` (an HTTP server's, the chat engine) while the block changes
        the model: training, export, adapters going on or off."""
        with self._model_lock(model_id), self.serve.exclusive(model_id), self.chat.exclusive(model_id):
            yield

    @contextmanager
    def _exclusive_for_training(self, model_id: str) -> Iterator[None]:
        """exclusive(), and the chat engine's cache given back to the run: sized for several chats, it would take
        memory the run's activations need. The next chat makes the engine again."""
        with self._model_lock(model_id), self.serve.exclusive(model_id), \
                self.chat.exclusive(model_id, free_cache=True):
            yield

    @contextmanager
    def _model_lock(self, model_id: str) -> Iterator[None]:
        with self._locks_lock:
            lock = self._model_locks.setdefault(model_id, threading.RLock())
        with lock:
            yield

    def _holding_model(self, handler: JobHandler) -> JobHandler:
        """`handler` run holding its model's lock: chats run beside other jobs now (`concurrent`), and this keeps
        a chat on the old path, which switches peft's layers, from meeting a job that changes or reads them."""
        def run(job: JobContext) -> dict[str, Any]:
            model_id = job.request.content.get("model_id")
            if not isinstance(model_id, str):
                return handler(job)
            with self._model_lock(model_id):
                return handler(job)
        return run

    def jobs(self) -> dict[str, JobHandler]:
        """Requests that run on the job thread; new GPU capabilities (train, export, serve) register here."""
        exports = {name: self.adapter_jobs.bare(handler) for name, handler in self.export.jobs().items()}
        adapters = self.adapter_jobs.jobs()
        adapters["adapter_load"] = self._attaching(adapters["adapter_load"])
        held = {name: self._holding_model(handler) for name, handler in {
            "load": self.load, "unload": self.unload, **exports, **self.serve.jobs(), **adapters,
            **self.train.jobs()}.items()}
        return {**held, "generate": self.generate}  # a chat takes the lock itself, on the old path only

    def _attaching(self, handler: JobHandler) -> JobHandler:
        """A session that puts an adapter on a model (qwen.adapters.load in a notebook that did not load the
        model) uses that model too: another notebook's unload must not take it away."""
        def run(job: JobContext) -> dict[str, Any]:
            reply = handler(job)
            self.registry.attach(job.request.content["model_id"], job.request.session)
            return reply
        return run

    def controls(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        """Requests beyond hello/status/cancel/shutdown answered at once on the main thread (content -> reply)."""
        return {**self.serve.controls(), **self.train.controls()}

    def close(self) -> None:
        """The worker is stopping: close what outlives requests (HTTP servers, chat engines)."""
        self.serve.close()
        self.chat.close()
