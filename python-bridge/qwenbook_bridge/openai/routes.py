"""The OpenAI-compatible HTTP routes: /v1/models, /v1/chat/completions and /v1/completions.

Each request is rendered to token ids here and decoded by the server's engine (`PagedEngine`, or the
`BatchScheduler` for a model the paged runner cannot read); events come back from the engine's thread into
the request's asyncio queue. Streams are written by a small ASGI response that also watches for the client
going away, so a disconnect cancels that request's generation.

Overload is answered, not absorbed (`ApiLimits`): a body over the size limit gets 413 while it is being
read, a body that does not finish arriving in time gets 408, and a request that would have to wait behind
a full queue gets 429 with Retry-After. Slow clients at the socket level (headers, stalled readers) are
the HTTP protocol's job, in serving.py.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from qwenbook_bridge.openai import schema as oa
from qwenbook_bridge.engine.generate.batching.requests import Finished, GenerationEvent, RequestHandle
from qwenbook_bridge.engine.generate.chat_prompt import ChatPrompt, check_messages, check_tools, render_chat
from qwenbook_bridge.engine.generate.reply_parts import Pieces, ReplyParser
from qwenbook_bridge.engine.generate.sampling import SamplingParams
from qwenbook_bridge.engine.generate.batching.scheduler import BatchScheduler
from qwenbook_bridge.engine.generate.paged.scheduler import PagedEngine
from qwenbook_bridge.engine.errors import EngineError, InvalidOptionError
from qwenbook_bridge.openai.serve_config import MiB, ApiLimits

log = logging.getLogger("qwenbook.serve")

@dataclass
class ApiState:
    """What the routes share with the server object: counters the notebook reads live."""

    requests_total: int = 0
    errors: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    stopping: bool = False
    rejected: int = 0  # requests turned away with 429 because the queue was full

    def error(self, status: int, message: str) -> None:
        self.errors += 1
        self.last_error, self.last_error_at = f"{status}: {message}", time.time()


class OpenAIApi:
    """Turns OpenAI requests into scheduler submissions and scheduler events into OpenAI responses."""

    def __init__(self, scheduler: PagedEngine | BatchScheduler, tokenizer: Any, generation_config: Any,
                 model_name: str, aliases: tuple[str, ...] = (), api_key: str | None = None,
                 limits: ApiLimits | None = None, adapters: dict[str, str] | None = None) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.names = (model_name, *[a for a in aliases if a != model_name])
        # Adapter name -> its folder (listed as the card's "root"); the engine holds each under that name.
        self.adapters = dict(adapters or {})
        self.api_key = api_key
        self.created = int(time.time())
        self.state = ApiState()
        # Touched by the event loop and by stop() on the caller's thread.
        self._handles: set[RequestHandle] = set()
        self._handles_lock = threading.Lock()
        self._mailbox: _Mailbox | None = None
        self.defaults = _sampling_defaults(generation_config)
        self.limits = limits or ApiLimits()
        # Moving average of how long a request took from submission to its last token, for Retry-After.
        self._duration_s: float | None = None

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

    async def read_json(self, request: Request) -> dict[str, Any]:
        """The request body as a JSON object, read with a size limit and a deadline.

        The limit is enforced while reading, so a huge or endless body costs at most `max_body_bytes` of
        memory whatever its Content-Length says (missing, or smaller than what is sent). After a 413 the
        HTTP protocol reads and drops the rest of the body, so an ordinary client that sends everything
        before reading still gets the 413 instead of a reset; the protocol's client timeout ends that too."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise self._too_large(f"{int(declared)} bytes")
        body = bytearray()
        try:
            async with asyncio.timeout(self.limits.client_timeout_s):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        raise self._too_large(f"more than {limit} bytes")
        except TimeoutError:
            raise oa.OpenAIError(
                408, f"The request body did not arrive within {self.limits.client_timeout_s:g} s "
                f"({len(body)} bytes came). Send the whole body at once, with a correct Content-Length.",
                code="request_timeout", headers={"connection": "close"}) from None
        return oa.parse_json(bytes(body))

    def _too_large(self, size: str) -> oa.OpenAIError:
        limit = self.limits.max_body_bytes
        return oa.OpenAIError(413, f"The request body is too large: {size}, and this server accepts at most "
                              f"{limit} bytes ({limit / MiB:g} MiB). Shorten the request, or start the server with "
                              "a larger maxBody (--max-body).", code="request_too_large")

    def check_model(self, name: str | None) -> str | None:
        """The adapter a request's "model" asks for; None for the base model (its name, an alias, or no name).
        An id this server does not serve is OpenAI's 404, listing the ids that it does."""
        if name is None or name in self.names:
            return None
        if name in self.adapters:
            return name
        served = ", ".join(f"`{n}`" for n in self.served_ids())
        raise oa.OpenAIError(404, f"The model `{name}` does not exist. This server serves {served} "
                             "(see GET /v1/models).", param="model", code="model_not_found")

    def served_ids(self) -> list[str]:
        """What /v1/models lists: the base model, then each adapter. Aliases are accepted but not listed:
        clients pick the first id they see."""
        return [self.model_name, *self.adapters]

    def model_cards(self) -> list[dict[str, Any]]:
        base = oa.model_card(self.model_name, self.created)
        # vLLM's LoRA cards: the adapter's folder as "root" and the base model as "parent".
        return [base, *({**oa.model_card(name, self.created), "root": folder, "parent": self.model_name}
                        for name, folder in self.adapters.items())]

    def chat_prompt(self, req: oa.ChatRequest) -> ChatPrompt:
        """The prompt through the model's template, built where the notebook's chat builds it (render_chat), so
        tools, tool results, earlier calls and the thinking switch render as transformers renders them. With
        tool_choice "none" the tools stay out of the prompt; "required" or a name opens the call in it."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise oa.bad_request("This model has no chat template, so chat messages cannot be turned into a "
                                 "prompt: use /v1/completions with a plain prompt instead.", "messages")
        try:
            tools = check_tools(req.tools) if req.tools and req.tool_choice != "none" else None
        except InvalidOptionError as exc:
            raise oa.bad_request(f"Invalid 'tools': {exc}.", "tools") from None
        force = None if req.tool_choice in ("none", "auto") else req.tool_choice
        try:
            messages = check_messages(req.messages)
        except InvalidOptionError as exc:
            raise oa.bad_request(f"Invalid 'messages': {exc}.", "messages") from None
        try:
            return render_chat(self.tokenizer, self.model_name, messages, tools=tools, thinking=req.thinking,
                               force_tool=force)
        except InvalidOptionError as exc:  # the template does not write tools, or tool_choice does not fit them
            raise oa.bad_request(f"{exc}.", "tools") from None
        except Exception as exc:  # jinja raises its own errors (e.g. "roles must alternate")
            raise oa.bad_request(f"The model's chat template cannot render these messages: {exc}", "messages",
                                 "invalid_messages") from None

    def completion_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            vocab = len(self.tokenizer)
            bad = [t for t in prompt if t >= vocab]
            if bad:
                raise oa.bad_request(f"'prompt' holds token ids outside the vocabulary (size {vocab}): {bad[:5]}",
                                     "prompt")
            return prompt
        return list(self.tokenizer(prompt)["input_ids"])

    def sampling(self, req: oa.CommonRequest, prompt_len: int, chat: bool) -> SamplingParams:
        """Fill unset options from the model's generation config. A prompt plus max_tokens beyond the context
        is a 400, as in vLLM and OpenAI: trimming max_tokens quietly would return a reply cut short of what
        the client asked for. Without max_tokens the reply may use the rest of the context."""
        ctx = self.scheduler.context_length
        room = ctx - prompt_len
        if room < 1:
            raise oa.context_too_long(ctx, prompt_len, None, chat)
        if req.max_tokens is not None and req.max_tokens > room:
            raise oa.context_too_long(ctx, prompt_len, req.max_tokens, chat)
        max_tokens = req.max_tokens or room
        chosen = {k: default if getattr(req, k) is None else getattr(req, k) for k, default in self.defaults.items()}
        try:
            # The body's ranges were checked above with OpenAI's wording; what is left (a seed beyond 64 bits) is
            # refused by SamplingParams under the API's own names.
            params = SamplingParams.from_openai(
                max_tokens=max_tokens, **chosen,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                stop=req.stop, ignore_eos=req.ignore_eos, seed=req.seed)
        except EngineError as exc:
            raise oa.bad_request(str(exc)) from None
        return params

    def submit(self, ids: list[int], params: SamplingParams,
               adapter: str | None = None) -> tuple[RequestHandle, asyncio.Queue[GenerationEvent]]:
        if self.state.stopping:
            raise oa.OpenAIError(503, "The server is shutting down.", type="server_error")
        # Requests beyond the batch's rows wait. Counted here, from submission to Finished, rather than from the
        # scheduler's rows and queue: a request being prefilled is in neither. Only this event loop submits
        # and retires HTTP requests, so the count cannot change between the check and the submit.
        rows = self.scheduler.config.max_batch_size
        in_flight = len(self._handles)
        waiting = max(0, in_flight - rows)
        if in_flight >= rows + self.limits.max_queue:
            self.state.rejected += 1
            after = self.retry_after()
            # OpenAI's own rate-limit answer: type "requests", code "rate_limit_exceeded", with Retry-After.
            raise oa.OpenAIError(
                429, f"The server is busy: {waiting} requests are already waiting for a place in the batch (at most "
                f"{self.limits.max_queue} may wait). Please retry after {after} s.", type="requests",
                code="rate_limit_exceeded", headers={"retry-after": str(after)})
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = _Mailbox(loop)
        mailbox = self._mailbox
        q: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        holder: list[RequestHandle] = []
        submitted = time.monotonic()

        def deliver(ev: GenerationEvent) -> None:
            # Runs on the event loop, after submit() has returned, so holder is filled.
            q.put_nowait(ev)
            if isinstance(ev, Finished):
                self._finished(holder[0], ev, time.monotonic() - submitted)

        try:
            sink = lambda ev: mailbox.post(deliver, ev)  # noqa: E731
            # Only the paged engine takes adapters; check_model never picks one for a server without them.
            handle = (self.scheduler.submit(ids, params, sink) if adapter is None else
                      self.scheduler.submit(ids, params, sink, adapter=adapter))  # type: ignore[call-arg]
        except InvalidOptionError as exc:  # this request can never run here, e.g. it outgrows the whole cache
            raise oa.bad_request(str(exc)) from None
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

    def _finished(self, handle: RequestHandle, ev: Finished, duration_s: float) -> None:
        with self._handles_lock:
            self._handles.discard(handle)
        if ev.finish_reason == "error":
            self.state.error(500, ev.error or "generation failed")
        elif ev.finish_reason != "cancelled":
            last = self._duration_s
            self._duration_s = duration_s if last is None else 0.8 * last + 0.2 * duration_s

    def retry_after(self) -> int:
        """Seconds a turned-away client should wait: the configured value, or else how long recent requests
        took from arrival to their last token, which is about when the batch has turned over and the queue
        has room again (1 s when nothing has finished yet, 60 s at most)."""
        if self.limits.retry_after_s is not None:
            return self.limits.retry_after_s
        return int(min(60, max(1, math.ceil(self._duration_s or 1.0))))

    def cancel_all(self) -> None:
        with self._handles_lock:
            handles = list(self._handles)
        for h in handles:
            h.cancel()


def build_app(api: OpenAIApi) -> Starlette:
    """Plain Starlette rather than FastAPI: validation is hand-written, and without pydantic the server runs
    on hosts that only have starlette, uvicorn and their pure-Python dependencies."""

    def fail(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
        api.state.error(status, body["error"]["message"])
        return JSONResponse(body, status_code=status, headers=headers)

    async def openai_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, oa.OpenAIError)
        return fail(exc.status, exc.body(), exc.headers)

    async def client_left(_: Request, __: Exception) -> Response:
        return Response(status_code=499)  # the client left while sending its body: nobody reads this

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
        return JSONResponse({"object": "list", "data": api.model_cards()})

    async def get_model(request: Request) -> Response:
        api.check_auth(request)
        adapter = api.check_model(request.path_params["name"])
        cards = api.model_cards()
        return JSONResponse(cards[api.served_ids().index(adapter)] if adapter else cards[0])

    async def chat(request: Request) -> Response:
        api.check_auth(request)
        req = oa.parse_chat_request(await api.read_json(request))
        adapter = api.check_model(req.model)
        prompt = api.chat_prompt(req)
        return await _generate(api, request, req, prompt.ids, adapter, chat=True, reply=_ChatReply(prompt, req))

    async def completions(request: Request) -> Response:
        api.check_auth(request)
        req = oa.parse_completion_request(await api.read_json(request))
        adapter = api.check_model(req.model)
        return await _generate(api, request, req, api.completion_prompt(req.prompt), adapter, chat=False)

    routes = [Route("/v1/models", list_models, methods=["GET"]),
              Route("/v1/models/{name:path}", get_model, methods=["GET"]),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={oa.OpenAIError: openai_error, HTTPException: http_error,
                                                        ClientDisconnect: client_left, Exception: internal_error})


class _ChatReply:
    """One chat reply read through the prompt's parser: reasoning, answer and tool calls, as OpenAI's message
    fields (whole) or delta fields (streamed). A malformed call stays in the answer as text, as the parser keeps it."""

    def __init__(self, prompt: ChatPrompt, req: oa.ChatRequest) -> None:
        self.parser: ReplyParser = prompt.parser()
        self.one_call = not req.parallel_tool_calls
        self.calls: list[dict[str, Any]] = []  # as sent, with their index

    def deltas(self, pieces: Pieces) -> list[dict[str, Any]]:
        """The delta objects for what one push() or flush() made safe to show, in the order the reply wrote it
        (reasoning comes before any answer text; calls come after the text before them)."""
        out: list[dict[str, Any]] = []
        if pieces.reasoning:
            out.append({"reasoning_content": pieces.reasoning})
        if pieces.content:
            out.append({"content": pieces.content})
        for call in pieces.tool_calls:
            if self.one_call and self.calls:
                continue  # parallel_tool_calls false: the first call only
            # The whole call at once: OpenAI's clients accumulate the arguments string of each index, so one
            # delta with the complete JSON is a valid stream of it.
            self.calls.append(oa.tool_call(call.id, call.name, call.arguments, index=len(self.calls)))
            out.append({"tool_calls": [self.calls[-1]]})
        return out

    def push(self, text: str) -> list[dict[str, Any]]:
        return self.deltas(self.parser.push(text))

    def flush(self) -> list[dict[str, Any]]:
        return self.deltas(self.parser.flush())

    def finish_reason(self, engine_reason: str) -> str:
        # OpenAI's "tool_calls": the model ended its turn after calling (an end token, not the length limit).
        return "tool_calls" if engine_reason == "stop" and self.calls else engine_reason

    def message_calls(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in c.items() if k != "index"} for c in self.calls]


async def _generate(api: OpenAIApi, request: Request, req: oa.CommonRequest, ids: list[int], adapter: str | None,
                    chat: bool, reply: _ChatReply | None = None) -> Response:
    params = api.sampling(req, len(ids), chat)
    handle, q = api.submit(ids, params, adapter)
    # The reply names the model as asked (an alias included), as vLLM does; the base model's name when none was.
    name = req.model or api.model_name
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
        if reply is None:
            return JSONResponse(oa.text_completion(rid, name, text, end.finish_reason, use))
        reply.push(text)
        reply.flush()
        calls = reply.message_calls()
        content = reply.parser.content if reply.parser.content or not calls else None
        return JSONResponse(oa.chat_completion(rid, name, content, reply.finish_reason(end.finish_reason), use,
                                               reasoning=reply.parser.reasoning or None, tool_calls=calls))

    created = int(time.time())
    include_usage = req.include_usage

    def chunk(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else \
                ({} if text is None else {"content": text})
            body = oa.chat_chunk(rid, name, created, delta, finish, include_usage)
        else:
            body = oa.completion_chunk(rid, name, created, text or "", finish, include_usage)
        return body

    def chat_chunks(deltas: list[dict[str, Any]]) -> bytes:
        return b"".join(_sse(oa.chat_chunk(rid, name, created, d, None, include_usage)) for d in deltas)

    def encode(ev: GenerationEvent) -> bytes:
        if not isinstance(ev, Finished):
            if reply is not None:
                return chat_chunks(reply.push(ev.text)) if ev.text else b""
            return _sse(chunk(ev.text, None)) if ev.text else b""
        if ev.finish_reason in ("error", "cancelled"):
            # Headers are gone already, so the failure travels as an error event, as vLLM sends it.
            message = f"Generation failed: {ev.error}" if ev.finish_reason == "error" else \
                "The request was cancelled (the server is stopping)."
            out = _sse(oa.OpenAIError(500 if ev.error else 503, message, type="server_error").body())
        else:
            finish = ev.finish_reason
            out = b""
            if reply is not None:  # text held back while it might have become a tag, then the finish reason
                out, finish = chat_chunks(reply.flush()), reply.finish_reason(finish)
            out += _sse(chunk(None, finish))
            if include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                use = oa.usage(ev.prompt_tokens, ev.completion_tokens)
                out += _sse(oa.usage_chunk(rid, obj, name, created, use))
        return out + b"data: [DONE]\n\n"

    async def sse() -> AsyncIterator[bytes]:
        if chat or prefix:
            yield _sse(chunk(prefix if not chat else None, None, first=chat))
        async for evs in batches():
            data = b"".join(encode(ev) for ev in evs)
            if data:
                yield data

    return _EventStream(sse(), handle)


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

    def __init__(self, chunks: AsyncIterator[bytes], handle: RequestHandle) -> None:
        # Not Response.__init__: it would declare a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
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
        "min_p": float(set_keys.get("min_p", 0.0) or 0.0) if sampled else 0.0,
        "repetition_penalty": float(set_keys.get("repetition_penalty", 1.0) or 1.0),
    }
