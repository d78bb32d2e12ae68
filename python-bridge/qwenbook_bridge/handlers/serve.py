"""serve_start / serve_stop / serve_status: OpenAI-compatible HTTP servers that live in the worker process.

A server shares the loaded model's weights (no second copy); one engine thread (`PagedEngine`, see
openai/server.py) decodes every HTTP request of that model in one batch. The worker's own `generate` on a
served model runs inside `exclusive(model_id)`, which parks the engine between two steps for the length of
the call, so the notebook waits at most one step and never decodes into the batch's cache.

LoRA adapters are served by name beside the base model (`adapters`: name -> folder, as vLLM's --lora-modules):
each folder is a client path, checked by handlers/paths.py like every other (inside --root when one is set),
and goes into a slot of the server's paged engine; a request's `model` picks the base or an adapter.

serve_start runs on the job thread (it must not change a model a training or export job is using);
serve_stop and serve_status are control requests answered on the main thread at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenbook_bridge.engine.errors import EngineError, InvalidOptionError
from qwenbook_bridge.handlers.paths import resolve_user_path

if TYPE_CHECKING:
    from qwenbook_bridge.engine.generate.paged.scheduler import PagedEngine
    from qwenbook_bridge.engine.llama_cpp.engine import LlamaCppEngine
    from qwenbook_bridge.engine.models.loading import LoadedModel, ModelRegistry
    from qwenbook_bridge.openai.server import OpenAIServer
    from qwenbook_bridge.handlers.context import JobContext

log = logging.getLogger("qwenbook.worker")

ControlHandler = Callable[[dict[str, Any]], dict[str, Any]]


class ServerConflictError(EngineError):
    """The model is already served with other options; the running server must be stopped first."""


@dataclass(frozen=True)
class _Asked:
    """The options a server was started with, as requested (port 0 stays 0), to recognise a repeat."""

    port: int
    host: str
    api_key: str | None
    name: str
    max_batch_size: int
    max_queue: int | None = None  # None: ServeConfig's default for the batch size
    max_body_bytes: int | None = None
    retry_after_s: int | None = None  # None: estimated
    client_timeout_s: float | None = None
    adapters: tuple[tuple[str, str], ...] = ()  # (name, folder) pairs, in the order asked
    memory_utilization: float | None = None  # None: ServeConfig's default


@dataclass
class _Served:
    server_id: str
    model_id: str
    asked: _Asked
    server: OpenAIServer

    def same_as(self, asked: _Asked) -> bool:
        """A repeat of this server's request; asking for the port it got when 0 was asked for counts too."""
        return replace(asked, port=self.asked.port) == self.asked and asked.port in (self.asked.port, self.server.port)

    def info(self) -> dict[str, Any]:
        s = self.server
        stats = {k: v for k, v in s.stats().to_dict().items() if v is not None}
        return {"server_id": self.server_id, "model_id": self.model_id, "name": s.config.model_name, "url": s.url,
                "host": s.config.host, "port": s.port, "auth": s.config.api_key is not None,
                "max_batch_size": s.config.max_batch_size, "max_queue": s.config.queue_limit,
                "max_body_bytes": s.config.max_body_bytes, "client_timeout_s": s.config.client_timeout_s,
                "adapters": {name: str(folder) for name, folder in s.config.adapters.items()},
                "curl_example": s.curl_example(), "stats": stats}


def default_name(loaded: LoadedModel) -> str:
    """What clients pass as `model` unless told otherwise: the hub id as written, else the folder's name."""
    source = loaded.source.rstrip("/")
    if "/" in source and not Path(source).expanduser().exists():
        return source
    return Path(source).name or loaded.model_id


class ServeHandlers:
    def __init__(self, registry: ModelRegistry, root: Path | None = None) -> None:
        self.registry = registry
        self.root = root  # adapter folders must resolve inside it (handlers/paths.py); None: anywhere
        # serve_start (job thread), serve_stop/serve_status (main thread) and generate (job thread) all read
        # this; the lock is held only to look up or change the table, never while a server starts or stops.
        self._lock = threading.Lock()
        self._servers: dict[str, _Served] = {}

    # ------------------------------------------------------------ job thread

    def start(self, job: JobContext) -> dict[str, Any]:
        from qwenbook_bridge.openai.server import OpenAIServer, ServeConfig

        content = job.request.content
        loaded = self.registry.get(content["model_id"])
        asked = _Asked(port=content.get("port", 8000), host=content.get("host", "127.0.0.1"),
                       api_key=content.get("api_key"), name=content.get("name") or default_name(loaded),
                       max_batch_size=content.get("max_batch_size", 32), max_queue=content.get("max_queue"),
                       max_body_bytes=content.get("max_body_bytes"), retry_after_s=content.get("retry_after_s"),
                       client_timeout_s=content.get("client_timeout_s"), adapters=self._adapters(content),
                       memory_utilization=content.get("memory_utilization"))
        with self._lock:
            current = next((s for s in self._servers.values() if s.model_id == loaded.model_id), None)
        if current is not None and not current.server.running:  # its HTTP thread died: replace it
            self._stop(lambda s: s is current)
            current = None
        if current is not None:
            if current.same_as(asked):
                return {"status": "ok", "server": current.info(), "already_running": True}
            raise ServerConflictError(
                f"{loaded.model_id} is already served at {current.server.url} as {current.asked.name!r}; stop that "
                "server first (await server.stop() on the Server that m.serve() returned), then serve it again "
                "with the new options")
        # An adapter's name wins over an alias that happens to equal it (a model folder named like the adapter).
        taken = {asked.name, *(name for name, _ in asked.adapters)}
        aliases = tuple(dict.fromkeys(a for a in (loaded.model_id, loaded.source) if a not in taken))
        limits = {k: v for k, v in (("max_body_bytes", asked.max_body_bytes),
                                    ("client_timeout_s", asked.client_timeout_s),
                                    ("memory_utilization", asked.memory_utilization)) if v is not None}
        config = ServeConfig(port=asked.port, host=asked.host, api_key=asked.api_key, model_name=asked.name,
                             aliases=aliases, max_batch_size=asked.max_batch_size, max_queue=asked.max_queue,
                             retry_after_s=asked.retry_after_s, adapters=dict(asked.adapters), **limits)
        server = OpenAIServer.for_loaded(loaded, config)
        server.start()  # PortInUseError names the port
        served = _Served(f"{asked.name}@{_host_port(asked.host, server.port)}", loaded.model_id, asked, server)
        with self._lock:
            self._servers[served.server_id] = served
        log.info("serving %s at %s (server %s)", loaded.model_id, server.url, served.server_id)
        return {"status": "ok", "server": served.info(), "already_running": False}

    @contextmanager
    def exclusive(self, model_id: str) -> Iterator[None]:
        """Hold `model_id`'s batch scheduler parked while the block uses the model (a no-op when not served)."""
        with self._lock:
            served = next((s for s in self._servers.values() if s.model_id == model_id), None)
        if served is None:
            yield
            return
        with served.server.scheduler.exclusive():
            yield

    def stop_model(self, model_id: str) -> list[dict[str, Any]]:
        """Stop the servers of a model about to go away (unload)."""
        return self._stop(lambda s: s.model_id == model_id)

    def close(self) -> None:
        """Stop every server: the worker is shutting down."""
        self._stop(lambda _: True)

    # ------------------------------------------------------------ control (main thread)

    def stop(self, content: dict[str, Any]) -> dict[str, Any]:
        server_id, model_id = content.get("server_id"), content.get("model_id")
        if (server_id is None) == (model_id is None):
            raise InvalidOptionError("serve_stop needs exactly one of server_id (one server) or model_id (the server "
                                     "of that model)")
        if server_id is not None:
            return {"status": "ok", "stopped": self._stop(lambda s: s.server_id == server_id)}
        return {"status": "ok", "stopped": self._stop(lambda s: s.model_id == model_id)}

    def status(self, content: dict[str, Any]) -> dict[str, Any]:
        server_id, model_id = content.get("server_id"), content.get("model_id")
        with self._lock:
            chosen = [s for s in self._servers.values()
                      if (server_id is None or s.server_id == server_id) and (model_id is None or s.model_id == model_id)]
        return {"status": "ok", "servers": [s.info() for s in chosen]}

    def paged_engines(self) -> list[tuple[str, PagedEngine | LlamaCppEngine]]:
        """(model id, engine) of each running server that decodes on a paged engine (the padded batch
        scheduler has no block cache to report), for status and the memory telemetry."""
        from qwenbook_bridge.engine.generate.paged.scheduler import PagedEngine
        from qwenbook_bridge.engine.llama_cpp.engine import LlamaCppEngine

        with self._lock:
            served = list(self._servers.values())
        return [(s.model_id, s.server.scheduler) for s in served
                if isinstance(s.server.scheduler, (PagedEngine, LlamaCppEngine)) and s.server.scheduler.running]

    # ------------------------------------------------------------ dispatch tables

    def jobs(self) -> dict[str, Callable[[JobContext], dict[str, Any]]]:
        return {"serve_start": self.start}

    def controls(self) -> dict[str, ControlHandler]:
        return {"serve_stop": self.stop, "serve_status": self.status}

    # ------------------------------------------------------------ helpers

    def _adapters(self, content: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        """serve_start's `adapters` with each folder checked as a client path (absolute, inside --root)."""
        return tuple((name, str(resolve_user_path(folder, self.root, f"adapters.{name}")))
                     for name, folder in (content.get("adapters") or {}).items())

    def _stop(self, match: Callable[[_Served], bool]) -> list[dict[str, Any]]:
        with self._lock:
            chosen = [s for s in self._servers.values() if match(s)]
            for s in chosen:
                del self._servers[s.server_id]
        stopped = []
        for s in chosen:
            try:
                s.server.stop()
            except Exception:  # one server failing to stop must not keep the others running
                log.exception("stopping server %s failed", s.server_id)
            log.info("stopped server %s", s.server_id)
            stopped.append(s.info())
        return stopped


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
