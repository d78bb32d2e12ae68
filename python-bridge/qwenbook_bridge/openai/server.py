"""Serve an already-loaded model as an OpenAI-compatible HTTP API from inside the worker process.

    server = OpenAIServer(model, tokenizer, ServeConfig(port=8000, api_key="sk-local", model_name="qwen"))
    server.start()            # raises PortInUseError naming the port before anything is reported started
    server.stats()            # live counters for the notebook (ServeStats)
    server.stop()             # frees the port; the model stays loaded

uvicorn runs on its own thread with its own event loop; the model is used only by the engine's thread: the
paged engine (`PagedEngine`: a block-paged key/value cache sized by ServeConfig.memory_utilization, prefix
caching, chunked prefill), or, for a model it cannot read (another architecture, LoRA layers injected into
the model), the padded `BatchScheduler`. Either shares the weights in memory (no second copy). Pass an engine
of your own to share it with the notebook's chat (see their exclusive() and call_between_steps() hooks).

LoRA adapters are served by name, as vLLM's --lora-modules: ServeConfig.adapters maps a name to a peft folder,
each goes into one of the paged engine's adapter slots, and a request's "model" picks the base (its name or an
alias) or an adapter. Rows of different adapters decode in the same step; /v1/models lists the base and each
adapter (with "parent" and "root", as vLLM does).

Under overload the server answers rather than piles up (ServeConfig's limits): 413 for bodies over
max_body_bytes, 429 with Retry-After once max_queue requests wait, 400 for prompt + max_tokens beyond the
context. Slow clients are cut off by `_GuardedH11Protocol` after client_timeout_s: headers that trickle,
a body that trickles (408, in serving_app), and a stream whose reader stopped reading (its row is cancelled
so that it stops taking a place in the batch).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from qwenbook_bridge.engine.generate.batching.scheduler import BatchConfig, BatchScheduler
from qwenbook_bridge.engine.generate.paged.scheduler import EngineConfig, PagedEngine
from qwenbook_bridge.engine.errors import EngineError, InvalidOptionError, first_sentences
from qwenbook_bridge.engine.llama_cpp.engine import LlamaCppEngine, LlamaEngineConfig, cpu_engine_choice
from qwenbook_bridge.engine.models.adapters import AdapterError
from qwenbook_bridge.openai.routes import OpenAIApi, build_app
from qwenbook_bridge.openai.serve_config import ServeConfig

log = logging.getLogger("qwenbook.serve")

__all__ = ["OpenAIServer", "PortInUseError", "ServeConfig", "ServeStats"]

# Largest request line plus headers h11 accepts (its own default, stated here because slow-client
# protection relies on it): a client cannot make the server hold more than this while headers arrive.
MAX_HEADER_BYTES = 16 * 1024
# Kernel send buffer per connection. Left to autotuning it grows to megabytes, which a client that stopped
# reading fills silently (a whole long reply) before the server notices; token streams need far less.
SEND_BUFFER_BYTES = 128 * 1024
LINGER_S = 2.0  # how long a connection closed mid-body keeps draining the client's bytes (see lingering_close)


class PortInUseError(EngineError):
    """Another program already listens on the port the server was asked to use."""


@dataclass(frozen=True)
class ServeStats:
    running: bool
    url: str  # base URL for OpenAI clients, e.g. http://127.0.0.1:8000/v1
    host: str
    port: int
    model_name: str
    requests_total: int
    requests_active: int
    requests_waiting: int  # queued behind a full batch
    requests_rejected: int  # turned away with 429: the queue was full
    errors: int
    tokens_generated: int
    tokens_per_second: float  # over the last few seconds
    last_error: str | None
    last_error_at: float | None  # unix time
    started_at: float | None  # unix time
    uptime_s: float
    adapters: list[str] = field(default_factory=list)  # adapter names served beside the base model
    memory_utilization: float | None = None  # share of the device the model and its cache may use
    # The paged engine's key/value cache; None under the padded BatchScheduler, which has no block cache.
    blocks_total: int | None = None
    blocks_used: int | None = None  # blocks held by running requests
    block_size: int | None = None  # tokens per block
    cache_bytes: int | None = None
    prefix_hit_rate: float | None = None  # share of looked-up prompt tokens found in the prefix cache

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class OpenAIServer:
    """An OpenAI-compatible HTTP server over one loaded model, with start/stop and live stats."""

    def __init__(self, model: Any, tokenizer: Any, config: ServeConfig | None = None,
                 scheduler: PagedEngine | BatchScheduler | None = None,
                 eos_token_ids: frozenset[int] | None = None) -> None:
        self.config = (config or ServeConfig()).validate()
        self.model = model
        self._owns_scheduler = scheduler is None
        self.scheduler = scheduler or _engine_for(model, tokenizer, self.config, eos_token_ids)
        adapters = {name: str(folder) for name, folder in self.config.adapters.items()}
        _load_adapters(self.scheduler, adapters)
        self.api = OpenAIApi(self.scheduler, tokenizer, getattr(model, "generation_config", None),
                             self.config.model_name, self.config.aliases, self.config.api_key, self.config.limits(),
                             adapters)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._port = self.config.port
        self._started_at: float | None = None
        self._thread_error: BaseException | None = None

    @classmethod
    def for_loaded(cls, loaded: Any, config: ServeConfig | None = None,
                   scheduler: PagedEngine | BatchScheduler | None = None) -> OpenAIServer:
        """Serve a `loading.LoadedModel` (its end-of-sequence ids included)."""
        return cls(loaded.model, loaded.tokenizer, config, scheduler, loaded.eos_token_ids)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = self.config.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else
                                                            (f"[{host}]" if ":" in host else host))
        return f"http://{shown}:{self._port}/v1"

    def curl_example(self, model: str | None = None) -> str:
        """A curl command that sends one chat request, to the base model or to `model` (e.g. an adapter)."""
        auth = f' -H "Authorization: Bearer {self.config.api_key}"' if self.config.api_key else ""
        body = json.dumps({"model": model or self.config.model_name,
                           "messages": [{"role": "user", "content": "Hello"}]})
        return f"curl {self.url}/chat/completions -H \"Content-Type: application/json\"{auth} -d '{body}'"

    def start(self, timeout: float = 30.0) -> None:
        """Bind the port, start the scheduler and the HTTP thread; return once requests are accepted."""
        if self.running:
            return
        import uvicorn

        sock = _bind(self.config.host, self.config.port)
        self._port = sock.getsockname()[1]
        self.api.state.stopping = False
        if self._owns_scheduler:
            self.scheduler.start()
        protocol = type("GuardedH11Protocol", (_GuardedH11Protocol,),
                        {"client_timeout_s": float(self.config.client_timeout_s)})
        config = uvicorn.Config(build_app(self.api), log_config=None, log_level="warning", access_log=False,
                                lifespan="off", http=protocol, loop="asyncio", timeout_keep_alive=5,
                                h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                                timeout_graceful_shutdown=int(max(1, self.config.shutdown_timeout_s)))
        self._server = uvicorn.Server(config)
        self._socket = sock
        self._thread_error = None
        self._thread = threading.Thread(target=self._serve, name=f"qwenbook-serve-{self._port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                reason = f": {self._thread_error}" if self._thread_error else ""
                raise EngineError(f"the HTTP server on port {self._port} did not start{reason}")
            time.sleep(0.01)
        self._started_at = time.time()
        log.info("serving %s at %s", self.config.model_name, self.url)

    def _serve(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as exc:  # reported by start() or stats(); the thread must not die silently
            self._thread_error = exc
            self.api.state.error(500, f"HTTP server stopped: {type(exc).__name__}: {exc}")

    def stop(self, timeout: float | None = None) -> None:
        """Cancel running requests, close the port and end the HTTP thread. The model stays loaded;
        start() may be called again."""
        self.api.state.stopping = True
        self.api.cancel_all()
        if self._owns_scheduler:
            # Before the HTTP side: ending the scheduler ends every stream now, even while it is parked by
            # exclusive(), where cancellations would otherwise wait for the park to end.
            self.scheduler.stop()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else self.config.shutdown_timeout_s + 10)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(5)
        if self._socket is not None:
            self._socket.close()  # uvicorn closes it too; this covers a server that never got going
        self._thread = self._server = self._socket = None
        self._started_at = None

    def stats(self) -> ServeStats:
        s = self.api.state
        b = self.scheduler.stats()
        last_error, last_at = s.last_error, s.last_error_at
        if b.last_error and not last_error:
            last_error = b.last_error
        cache = {k: getattr(b, k, None) for k in ("blocks_total", "blocks_used", "block_size", "cache_bytes",
                                                    "prefix_hit_rate")}
        return ServeStats(**cache, adapters=list(self.api.adapters),
                          memory_utilization=getattr(self.scheduler.config, "memory_utilization", None),
            running=self.running, url=self.url, host=self.config.host, port=self._port,
            model_name=self.config.model_name, requests_total=s.requests_total, requests_active=self.api.active,
            requests_waiting=b.waiting, requests_rejected=s.rejected, errors=s.errors,
            tokens_generated=b.tokens_generated, tokens_per_second=b.tokens_per_second, last_error=last_error, last_error_at=last_at,
            started_at=self._started_at, uptime_s=round(time.time() - self._started_at, 3) if self._started_at else 0.0)

    def __enter__(self) -> OpenAIServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with two deadlines it lacks, so that a slow client cannot hold a
    connection (and, when streaming, a place in the batch) forever:

    - headers: from connect, and from the end of each response, the next request's headers must be
      complete within `client_timeout_s` (uvicorn's keep-alive timeout starts only after a response and
      stops at the first byte, so a client sending one header byte at a time was never cut off);
    - a stalled reader: once the socket's write buffer is full (the client stopped reading), the client
      has `client_timeout_s` to start reading again. Otherwise the connection is aborted, which the
      stream sees as a disconnect and answers by cancelling its row; until then at most one write is
      blocked and the tokens waiting for it are bounded by that time.
    """

    client_timeout_s: float = 30.0

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._lingering = False
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        super().connection_made(transport)
        self._arm_header_timer()
        # uvicorn closes the transport right after a Connection: close response. If the client is still sending
        # a body (a 408 for a trickling one), its unread bytes make the kernel answer the close with a reset,
        # which can discard the response before the client reads it. So such a close is a lingering one: send
        # the response and a FIN, keep reading and dropping what comes, and close once the client has closed or
        # LINGER_S has passed (what HTTP servers have long done for the same reason).
        close = transport.close

        def lingering_close() -> None:
            if self._lingering or transport.is_closing() or not transport.can_write_eof() or \
                    self.conn.their_state is not h11.SEND_BODY:
                return close()
            self._lingering = True
            transport.write_eof()
            if self.flow is not None:
                self.flow.resume_reading()
            self.loop.call_later(LINGER_S, close)

        transport.close = lingering_close

    def data_received(self, data: bytes) -> None:
        if not self._lingering:  # a lingering connection's answer is sent: what still arrives is dropped
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._stall_timer = None
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.client_timeout_s, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.client_timeout_s, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        # No request in progress: the client is still sending headers, or (after a 413) a body nobody reads.
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            log.info("closing a connection from %s: no complete request within %g s", self.client,
                     self.client_timeout_s)
            self.transport.abort()

    def _stalled(self) -> None:
        self._stall_timer = None
        if not self.transport.is_closing():
            log.info("closing a connection from %s: it read nothing for %g s", self.client, self.client_timeout_s)
            # abort, not close: close would wait for the unread data to drain, which is what never happens.
            self.transport.abort()


def _engine_for(model: Any, tokenizer: Any, config: ServeConfig,
                eos_token_ids: frozenset[int] | None) -> PagedEngine | BatchScheduler | LlamaCppEngine:
    """On the CPU, the llama.cpp engine on the model's GGUF copy (as notebook chat) where it applies. Else the
    paged engine when it can read the model's weights; otherwise the padded batch scheduler, which runs the
    model's own forward (any architecture transformers knows, LoRA layers injected by peft). Adapters served by
    name need the paged engine's slots: without them there is no fallback."""
    slots = len(config.adapters)
    if not slots and (llama := _llama_engine(model, tokenizer, config, eos_token_ids)) is not None:
        return llama
    try:
        return PagedEngine(model, tokenizer, EngineConfig(max_batch_size=config.max_batch_size,
                                                          context_length=config.context_length,
                                                          memory_utilization=config.memory_utilization,
                                                          max_adapters=slots,
                                                          max_lora_rank=config.max_lora_rank if slots else 64),
                           eos_token_ids)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, EngineError):  # a bad option or too little memory: the caller must hear of it
            raise
        if slots:
            raise InvalidOptionError(
                f"LoRA adapters are served by name only by the paged engine, which cannot run this model ({exc}); "
                "serve it without adapters, or merge the adapter into the model and serve that") from None
        log.info("serving with the padded batch scheduler, since the paged engine cannot run this model: %s", exc)
        return BatchScheduler(model, tokenizer, BatchConfig(config.max_batch_size, config.context_length),
                              eos_token_ids)


def _load_adapters(scheduler: PagedEngine | BatchScheduler, adapters: dict[str, str]) -> None:
    """Put each adapter into a slot of the engine (before it starts, so the first request finds them all).
    A shared engine may hold some already: those keep their slot."""
    if not adapters:
        return
    if not isinstance(scheduler, PagedEngine):
        raise InvalidOptionError(f"LoRA adapters are served by name only by the paged engine, not by "
                                 f"{type(scheduler).__name__}: serve this model without adapters")
    have = set(scheduler.adapters())
    for name, folder in adapters.items():
        if name not in have:
            try:
                scheduler.add_adapter(name, folder)
            except AdapterError as exc:  # e.g. a DoRA adapter or other modules: say which one
                raise InvalidOptionError(f"adapter {name!r} cannot be served: {exc}") from None


def _bind(host: str, port: int) -> socket.socket:
    """Bind and listen here, before uvicorn runs, so a busy port is a clear error raised by start()."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidOptionError(f"host {host!r} cannot be resolved ({exc.strerror}): use an IP address such as "
                                 "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    # Lets a restarted server take its port back while old connections sit in TIME_WAIT; unlike
    # SO_REUSEPORT it still refuses a port that another program is listening on.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(f"port {port} on {host} is already in use by another program: stop that program "
                                 f"or choose another port (e.g. port {port + 1 if port < 65535 else 8000})") from None
        if exc.errno == errno.EACCES:
            raise PortInUseError(f"port {port} on {host} needs administrator rights: choose a port above 1023") \
                from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise InvalidOptionError(f"host {host!r} is not an address of this machine: use 127.0.0.1 or 0.0.0.0") \
                from None
        raise
    return sock


def _llama_engine(model: Any, tokenizer: Any, config: ServeConfig,
                  eos_token_ids: frozenset[int] | None) -> LlamaCppEngine | None:
    """The llama.cpp engine for a base model on the CPU, or None (another device, QWENBOOK_CPU_ENGINE=pytorch,
    LoRA layers in the model, or llama.cpp cannot run it: the reason logged)."""
    from qwenbook_bridge.engine.llama_cpp.gguf_cache import gguf_for
    from qwenbook_bridge.engine.model_parts import has_injected_adapters

    if next(model.parameters()).device.type != "cpu" or cpu_engine_choice() != "llama.cpp" or \
            has_injected_adapters(model):
        return None
    try:
        # Up to 8 sequences at once: a CPU's throughput is spent by then, and more queue in the server.
        return LlamaCppEngine(model, tokenizer, gguf_for(model, tokenizer),
                              LlamaEngineConfig(max_batch_size=min(config.max_batch_size, 8),
                                                context_length=config.context_length), eos_token_ids)
    except Exception as exc:  # no library, an architecture the GGUF writer does not know, no disk space, ...
        log.warning("serving on PyTorch, not llama.cpp: %s", first_sentences(exc))
        return None
