"""The OpenAI-compatible HTTP routes: /v1/models, /v1/chat/completions and /v1/completions.

Each request is rendered to token ids here and decoded by the shared `BatchScheduler`; events come back
from the scheduler thread into the request's asyncio queue. Streams are written by a small ASGI response
that also watches for the client going away, so a disconnect cancels that request's generation.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import openai_schema as oa
from .batch_requests import Finished, GenerationEvent, RequestHandle
from .batch_sampling import SamplingParams
from .continuous_batching import BatchScheduler
from .errors import EngineError

log = logging.getLogger("qwenbook.serve")
WARNING_HEADER = "x-qwenbook-warning"


@dataclass
class ApiState:
    """What the routes share with the server object: counters the notebook reads live."""

    requests_total: int = 0
    errors: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    stopping: bool = False

    def error(self, status: int, message: str) -> None:
        self.errors += 1
        self.last_error, self.last_error_at = f"{status}: {message}", time.time()


class OpenAIApi:
    """Turns OpenAI requests into scheduler submissions and scheduler events into OpenAI responses."""

    def __init__(self, scheduler: BatchScheduler, tokenizer: Any, generation_config: Any, model_name: str,
                 aliases: tuple[str, ...] = (), api_key: str | None = None) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.names = (model_name, *[a for a in aliases if a != model_name])
        self.api_key = api_key
        self.created = int(time.time())
        self.state = ApiState()
        # Touched by the event loop and by stop() on the caller's thread.
        self._handles: set[RequestHandle] = set()
        self._handles_lock = threading.Lock()
        self._mailbox: _Mailbox | None = None
        self.defaults = _sampling_defaults(generation_config)

    # ---- request preparation ---------------------------------------------------------------------

    def check_auth(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise oa.OpenAIError(401, "You didn't provide an API key. Send it in an 'Authorization: Bearer <key>' "
                                 "header (the openai client's api_key).", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise oa.OpenAIError(401, "Incorrect API key provided. Use the key the server was started with.",
                                 code="invalid_api_key")

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise oa.OpenAIError(404, f"The model `{name}` does not exist. This server serves "
                                 f"`{self.model_name}` (see GET /v1/models).", param="model", code="model_not_found")

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise oa.bad_request("This model has no chat template, so chat messages cannot be turned into a "
                                 "prompt: use /v1/completions with a plain prompt instead.", "messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja raises its own errors (e.g. "roles must alternate")
            raise oa.bad_request(f"The model's chat template cannot render these messages: {exc}", "messages",
                                 "invalid_messages") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def completion_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            vocab = len(self.tokenizer)
            bad = [t for t in prompt if t >= vocab]
            if bad:
                raise oa.bad_request(f"'prompt' holds token ids outside the vocabulary (size {vocab}): {bad[:5]}",
                                     "prompt")
            return prompt
        return list(self.tokenizer(prompt)["input_ids"])

    def sampling(self, req: oa.GenerationOptions, prompt_len: int) -> tuple[SamplingParams, str | None]:
        """Fill unset options from the model's generation config and clamp max_tokens to the context."""
        ctx = self.scheduler.context_length
        room = ctx - prompt_len
        if room < 1:
            raise oa.bad_request(f"This model's maximum context length is {ctx} tokens, but the prompt has "
                                 f"{prompt_len} tokens. Shorten the prompt.", "messages", "context_length_exceeded")
        warning = None
        max_tokens = req.max_tokens or room
        if max_tokens > room:
            warning = (f"max_tokens={max_tokens} was reduced to {room}: the model's context holds {ctx} tokens "
                       f"and the prompt uses {prompt_len}.")
            max_tokens = room
        chosen = {k: default if getattr(req, k) is None else getattr(req, k) for k, default in self.defaults.items()}
        try:
            params = SamplingParams(
                max_tokens=max_tokens, **chosen,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                stop=req.stop, ignore_eos=req.ignore_eos, seed=req.seed)
        except EngineError as exc:
            raise oa.bad_request(str(exc)) from None
        return params, warning

    def submit(self, ids: list[int], params: SamplingParams) -> tuple[RequestHandle, asyncio.Queue[GenerationEvent]]:
        if self.state.stopping:
            raise oa.OpenAIError(503, "The server is shutting down.", type="server_error")
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = _Mailbox(loop)
        mailbox = self._mailbox
        q: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        holder: list[RequestHandle] = []

        def deliver(ev: GenerationEvent) -> None:
            # Runs on the event loop, after submit() has returned, so holder is filled.
            q.put_nowait(ev)
            if isinstance(ev, Finished):
                self._finished(holder[0], ev)

        try:
            handle = self.scheduler.submit(ids, params, lambda ev: mailbox.post(deliver, ev))
        except EngineError as exc:
            raise oa.OpenAIError(503, f"The model is not accepting requests: {exc}", type="server_error") from None
        holder.append(handle)
        with self._handles_lock:
            self._handles.add(handle)
        self.state.requests_total += 1
        return handle, q

    @property
    def active(self) -> int:
        """Requests still generating (a stream whose client left counts until its cancel lands)."""
        return len(self._handles)

    def _finished(self, handle: RequestHandle, ev: Finished) -> None:
        with self._handles_lock:
            self._handles.discard(handle)
        if ev.finish_reason == "error":
            self.state.error(500, ev.error or "generation failed")

    def cancel_all(self) -> None:
        with self._handles_lock:
            handles = list(self._handles)
        for h in handles:
            h.cancel()


def build_app(api: OpenAIApi) -> Starlette:
    """Plain Starlette rather than FastAPI: validation is hand-written, and without pydantic the server runs
    on hosts that only have starlette, uvicorn and their pure-Python dependencies."""

    def fail(status: int, body: dict[str, Any]) -> JSONResponse:
        api.state.error(status, body["error"]["message"])
        return JSONResponse(body, status_code=status)

    async def openai_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, oa.OpenAIError)
        return fail(exc.status, exc.body())

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        message = (f"Unknown path {request.method} {request.url.path}. This server offers GET /v1/models, "
                   "POST /v1/chat/completions and POST /v1/completions.") if exc.status_code in (404, 405) \
            else str(exc.detail)
        return fail(exc.status_code, oa.OpenAIError(exc.status_code, message).body())

    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.error("request failed: %s: %s", type(exc).__name__, exc)
        return fail(500, oa.OpenAIError(500, f"{type(exc).__name__}: {exc}", type="server_error").body())

    async def list_models(request: Request) -> Response:
        api.check_auth(request)
        # Aliases are accepted as `model` but not listed: clients pick the first id they see.
        return JSONResponse(oa.models_list([api.model_name], api.created))

    async def get_model(request: Request) -> Response:
        api.check_auth(request)
        api.check_model(request.path_params["name"])
        return JSONResponse(oa.model_card(api.model_name, api.created))

    async def chat(request: Request) -> Response:
        api.check_auth(request)
        req = oa.parse_chat_request(oa.parse_json(await request.body()))
        api.check_model(req.model)
        return await _generate(api, request, req, api.chat_prompt(req.messages), chat=True)

    async def completions(request: Request) -> Response:
        api.check_auth(request)
        req = oa.parse_completion_request(oa.parse_json(await request.body()))
        api.check_model(req.model)
        return await _generate(api, request, req, api.completion_prompt(req.prompt), chat=False)

    routes = [Route("/v1/models", list_models, methods=["GET"]),
              Route("/v1/models/{name:path}", get_model, methods=["GET"]),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={oa.OpenAIError: openai_error, HTTPException: http_error,
                                                        Exception: internal_error})


async def _generate(api: OpenAIApi, request: Request, req: oa.GenerationOptions, ids: list[int],
                    chat: bool) -> Response:
    params, warning = api.sampling(req, len(ids))
    handle, q = api.submit(ids, params)
    headers = {WARNING_HEADER: warning} if warning else {}
    name = api.model_name
    rid = oa.new_id("chatcmpl" if chat else "cmpl")
    prefix = ""
    if isinstance(req, oa.CompletionRequest) and req.echo:
        prefix = req.prompt if isinstance(req.prompt, str) else api.tokenizer.decode(req.prompt)

    async def batches() -> AsyncIterator[list[GenerationEvent]]:
        """Everything that has arrived, in one go: a slow reader gets one write per wake-up, not per token."""
        while True:
            evs = [await q.get()]
            while not q.empty():
                evs.append(q.get_nowait())
            yield evs
            if isinstance(evs[-1], Finished):  # always a request's last event
                return

    if not req.stream:
        watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, handle))
        try:
            parts, end = [], None
            async for evs in batches():
                for ev in evs:
                    if isinstance(ev, Finished):
                        end = ev
                    else:
                        parts.append(ev.text)
        finally:
            watcher.cancel()
        assert end is not None
        if end.finish_reason == "error":
            raise oa.OpenAIError(500, f"Generation failed: {end.error}", type="server_error")
        if end.finish_reason == "cancelled":
            if api.state.stopping:
                raise oa.OpenAIError(503, "The server is stopping; the request was cancelled.", type="server_error")
            return Response(status_code=499)  # the client left: nobody reads this, and it is not a server error
        use = oa.usage(end.prompt_tokens, end.completion_tokens)
        text = prefix + "".join(parts)
        body = (oa.chat_completion if chat else oa.text_completion)(rid, name, text, end.finish_reason, use, warning)
        return JSONResponse(body, headers=headers)

    created = int(time.time())
    include_usage = req.include_usage

    def chunk(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else \
                ({} if text is None else {"content": text})
            body = oa.chat_chunk(rid, name, created, delta, finish, include_usage)
        else:
            body = oa.completion_chunk(rid, name, created, text or "", finish, include_usage)
        if first and warning:
            body["warning"] = warning
        return body

    def encode(ev: GenerationEvent) -> bytes:
        if not isinstance(ev, Finished):
            return _sse(chunk(ev.text, None)) if ev.text else b""
        if ev.finish_reason in ("error", "cancelled"):
            # Headers are gone already, so the failure travels as an error event, as vLLM sends it.
            message = f"Generation failed: {ev.error}" if ev.finish_reason == "error" else \
                "The request was cancelled (the server is stopping)."
            out = _sse(oa.OpenAIError(500 if ev.error else 503, message, type="server_error").body())
        else:
            out = _sse(chunk(None, ev.finish_reason))
            if include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                use = oa.usage(ev.prompt_tokens, ev.completion_tokens)
                out += _sse(oa.usage_chunk(rid, obj, name, created, use))
        return out + b"data: [DONE]\n\n"

    async def sse() -> AsyncIterator[bytes]:
        if chat or prefix or warning:
            yield _sse(chunk(prefix if not chat else None, None, first=chat))
        async for evs in batches():
            data = b"".join(encode(ev) for ev in evs)
            if data:
                yield data

    return _EventStream(sse(), handle, headers)


class _Mailbox:
    """Carries scheduler events to the event loop with one wake-up per decode step instead of one per token
    and stream: each wake-up is a system call and a GIL hand-over, which add up at 32 streams."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: collections.deque[tuple[Callable[[GenerationEvent], None], GenerationEvent]] = \
            collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, deliver: Callable[[GenerationEvent], None], ev: GenerationEvent) -> None:
        with self._lock:
            self._pending.append((deliver, ev))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the server stopped while this request ran
            pass

    def _drain(self) -> None:
        with self._lock:
            items = list(self._pending)
            self._pending.clear()
            self._scheduled = False
        for deliver, ev in items:
            deliver(ev)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _cancel_on_disconnect(receive: Callable[[], Any], handle: RequestHandle) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


class _EventStream(Response):
    """A server-sent-events response that cancels its request when the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], handle: RequestHandle, headers: dict[str, str]) -> None:
        # Not Response.__init__: it would declare a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no", **headers})
        self.chunks, self.handle = chunks, handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, self.handle))
        try:
            async for data in self.chunks:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the transport failed under us: same as a disconnect
            self.handle.cancel()
        finally:
            watcher.cancel()
            if not self.handle.done.is_set():
                self.handle.cancel()
            await self.chunks.aclose()  # type: ignore[attr-defined]


def _sampling_defaults(generation_config: Any) -> dict[str, Any]:
    """Unset request options follow the model's generation_config.json, as vLLM does: an instruct model's
    recommended temperature/top_p/top_k/repetition_penalty apply unless the client says otherwise."""
    set_keys = generation_config.to_diff_dict() if generation_config is not None else {}
    sampled = bool(set_keys.get("do_sample"))
    return {
        "temperature": float(set_keys.get("temperature", 1.0)) if sampled else 1.0,
        "top_p": float(set_keys.get("top_p", 1.0)) if sampled else 1.0,
        "top_k": int(set_keys.get("top_k", 0) or 0) if sampled else 0,
        "repetition_penalty": float(set_keys.get("repetition_penalty", 1.0) or 1.0),
    }
