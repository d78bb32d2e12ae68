"""Chat generation: a reply's tokens from the chat engine (a `PagedEngine` shared by every chat with the model,
see chat_engine.py) when the caller passes one, else from a decode loop of our own (the fast decoder or
transformers' forward, see decoders.py).

Either way this module owns the reply: end tokens, stop strings, the budget, cancelling, streaming and timings are
applied here to the tokens as they come, so every path gives the same result fields. Greedy output matches
`model.generate(do_sample=False)` token for token; the tests hold it to that.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from qwenbook_bridge.engine.errors import (EngineError, GenerationOutOfMemoryError, InvalidOptionError,
    ModelNotLoadedError, first_sentences, is_out_of_memory)
from qwenbook_bridge.engine.generate.chat_prompt import check_messages, check_tools, render_chat
from qwenbook_bridge.engine.models.loading import LoadedModel, free_memory
from qwenbook_bridge.engine.generate.sampling import MAX_EOS_IDS, SamplingParams, apply_penalties, make_sampler
from qwenbook_bridge.engine.generate.streaming import IncrementalDetokenizer, StopStringFilter

if TYPE_CHECKING:
    from qwenbook_bridge.engine.generate.paged.scheduler import PagedEngine
    from qwenbook_bridge.engine.llama_cpp.engine import LlamaCppEngine

@dataclass
class TokenDelta:
    text: str  # answer text
    token_ids: list[int]
    index: int  # tokens generated before this delta
    reasoning: str = ""  # reasoning text (inside <think>), for templates that think
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # calls completed in this delta


@dataclass
class GenerationResult:
    text: str  # the answer, without reasoning and tool calls
    token_ids: list[int]
    finish_reason: str  # stop (end-of-sequence token) | tool_calls (stopped after calling) | length | stop_string | cancelled
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float  # call start (templating included) to the first sampled token
    duration_ms: float
    tokens_per_s: float  # decode speed: tokens after the first over the time after the first
    reasoning: str = ""
    reasoning_tokens: int = 0  # tokens until the reasoning block closed
    reasoning_ms: float = 0.0  # first token to the end of the reasoning
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # {id, name, arguments}
    tool_call_errors: list[dict[str, Any]] = field(default_factory=list)  # {text, error}: kept in `text`

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EngineDeclined(EngineError):
    """The chat engine cannot take this request (it outgrows the engine's whole cache); nothing was generated,
    so the caller runs it on the old path instead."""


def prompt_ids(loaded: LoadedModel, messages: Sequence[dict[str, Any]]) -> list[int]:
    """The chat-formatted prompt, ending with the assistant turn's opening."""
    return render_chat(loaded.tokenizer, loaded.model_id, check_messages(messages)).ids


def _token_stream(loaded: LoadedModel, prompt: list[int], budget: int, context: int, opts: SamplingParams,
                  stop_ids: set[int]) -> Iterator[int]:
    """The reply's tokens, one at a time, from the fast decoder where it applies (engine/generate/decoders.py), else
    from transformers' forward with a dynamic cache. Closing the iterator stops decoding."""
    from qwenbook_bridge.engine.generate.decoders import decoder_for

    model = loaded.model
    # Penalties look at the tokens so far, which the fast decoder's captured step does not; they take the plain loop.
    decoder = None if opts.penalized else decoder_for(model, loaded.device, len(prompt) + budget, context)
    # A decoder serves one request at a time; a second request for the same model meanwhile takes the plain loop.
    if decoder is not None and decoder.busy.acquire(blocking=False):
        try:
            yield from _fast_stream(decoder, prompt, budget, opts, stop_ids)
        finally:
            decoder.busy.release()
        return
    yield from _plain_stream(model, loaded.device, prompt, opts)


class _EngineTokens:
    """A request's tokens from the chat engine, one at a time. The engine is asked for plain tokens (no end
    tokens, no stop strings: generate() applies those, as for the other loops); closing cancels the request.
    `ended` says the engine ended it early (cancelled, or stopped with the model)."""

    def __init__(self, engine: PagedEngine | LlamaCppEngine, prompt: list[int], budget: int, opts: SamplingParams,
                 adapter: str | None, cancel: threading.Event | None) -> None:
        if not engine.holds(len(prompt) + budget - 1):  # the last token sampled is never cached
            raise EngineDeclined(f"the request's {len(prompt)} prompt tokens and {budget} to generate do not fit "
                                 "the chat engine's cache")
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        params = replace(opts, max_tokens=budget, stop=(), stop_token_ids=(), ignore_eos=True)
        self._handle = engine.submit(prompt, params, self._events.put, adapter=adapter)
        self._cancel = cancel
        self.ended = False

    def __iter__(self) -> Iterator[int]:
        from qwenbook_bridge.engine.generate.batching.requests import Finished

        while True:
            try:
                event = self._events.get(timeout=0.05)
            except queue.Empty:
                # A queued or parked request sends nothing for a while; cancelling must not wait for it.
                if self._cancel is not None and self._cancel.is_set():
                    self.ended = True
                    return
                continue
            if isinstance(event, Finished):
                if event.finish_reason == "error":
                    # A RuntimeError, as the failed step raised it, so an allocator failure reads as one.
                    raise RuntimeError(event.error or "the chat engine failed")
                self.ended = event.finish_reason == "cancelled"
                return
            yield from event.token_ids

    def close(self) -> None:
        if not self._handle.done.is_set():
            self._handle.cancel()


def _fast_stream(decoder: Any, prompt: list[int], budget: int, opts: SamplingParams,
                 stop_ids: set[int]) -> Iterator[int]:
    # The device-side end check has MAX_EOS_IDS slots; the caller checks every stop id on the host anyway.
    device_stops = sorted(stop_ids)[:MAX_EOS_IDS]
    for step in decoder.stream([prompt], budget, opts, eos_token_ids=device_stops):
        if step[0] is None:
            return
        yield step[0]


def _plain_stream(model: Any, device: torch.device, prompt: list[int], opts: SamplingParams) -> Iterator[int]:
    from transformers import DynamicCache

    sample = make_sampler(opts, device)
    cache = DynamicCache(config=model.config)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    ids = torch.tensor([prompt], device=device)
    prompt_t = ids[0]
    output: list[int] = []
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, **extra).logits[0, -1]
    while True:
        if opts.penalized:
            logits = apply_penalties(logits.float().clone(), opts, prompt_t, output)
        next_id = sample(logits)
        output.append(int(next_id))
        yield output[-1]
        logits = model(input_ids=next_id.view(1, 1), past_key_values=cache, use_cache=True).logits[0, -1]


def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def generate(loaded: LoadedModel, messages: Sequence[dict[str, Any]], opts: SamplingParams | None = None,
             on_token: Callable[[TokenDelta], None] | None = None,
             cancel: threading.Event | None = None, engine: PagedEngine | LlamaCppEngine | None = None,
             adapter: str | None = None, tools: Sequence[dict[str, Any]] | None = None,
             thinking: bool | None = None) -> GenerationResult:
    """Generate a chat reply. `on_token` gets text deltas as they become safe to show; `cancel` stops the
    loop before the next token and the result keeps the partial reply. With `engine` the tokens come from that
    running chat engine (a PagedEngine, or a LlamaCppEngine on the CPU), with its
    adapter `adapter` (a name added there; None: the base model); a request too
    large for its cache raises EngineDeclined before anything is generated. `tools` go to the template and the
    reply's calls are parsed out of its text; `thinking` is the template's enable_thinking (None: its default),
    and a reasoning block is split out of the answer."""
    started = time.perf_counter()
    opts = opts or SamplingParams()
    model = loaded.model
    if model is None:
        raise ModelNotLoadedError(f"model {loaded.model_id!r} was unloaded; load it again")
    chat = render_chat(loaded.tokenizer, loaded.model_id, check_messages(messages),
                       tools=check_tools(tools) if tools else None, thinking=thinking)
    prompt = chat.ids
    parser = chat.parser()
    reasoning_tokens, reasoning_end = 0, None
    budget = opts.max_tokens
    context = int(loaded.info.get("context_length") or 0)
    if context:
        if len(prompt) >= context:
            raise InvalidOptionError(
                f"the prompt is {len(prompt)} tokens but {loaded.model_id} holds at most {context}; "
                "shorten the conversation or the system prompt")
        budget = min(budget, context - len(prompt))

    detok = IncrementalDetokenizer(loaded.tokenizer)
    stops = StopStringFilter(opts.stop)
    eos = set(opts.stop_token_ids) | (set() if opts.ignore_eos else set(loaded.eos_token_ids))
    pieces: list[str] = []
    token_ids: list[int] = []
    pending: list[int] = []  # ids whose text has not been delivered yet
    delivered = 0

    def deliver(text: str, final: bool = False) -> None:
        nonlocal pending, delivered, reasoning_tokens, reasoning_end
        got = parser.push(text)
        if final:
            more = parser.flush()
            got.reasoning += more.reasoning
            got.content += more.content
            got.tool_calls += more.tool_calls
        if reasoning_end is None and parser.reasoning and parser.reasoning_done:
            reasoning_tokens, reasoning_end = len(token_ids), time.perf_counter()
        if got.content:
            pieces.append(got.content)
        if on_token is not None and (got or pending):
            on_token(TokenDelta(got.content, pending, delivered, got.reasoning,
                                [c.to_dict() for c in got.tool_calls]))
        delivered += len(pending)
        pending = []

    finish, tail = "length", ""
    t_first = t_last = None
    failure: GenerationOutOfMemoryError | None = None
    tokens: Iterator[int] | None = None
    from_engine = None
    if engine is not None and not (cancel is not None and cancel.is_set()):
        from_engine = _EngineTokens(engine, prompt, budget, opts, adapter, cancel)
    try:
        with torch.inference_mode():
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
            else:
                tokens = iter(from_engine) if from_engine is not None else _token_stream(
                    loaded, prompt, budget, context, opts, eos)
                for token in tokens:
                    t_last = time.perf_counter()
                    if t_first is None:
                        t_first = t_last
                    token_ids.append(token)
                    pending.append(token)
                    if token in eos:
                        finish = "stop"
                        break
                    text = stops.push(detok.push(token))
                    if stops.hit is not None:
                        finish, tail = "stop_string", text  # the text before the stop string
                        break
                    if text:
                        deliver(text)
                    if len(token_ids) >= budget:
                        finish = "length"
                        break
                    if cancel is not None and cancel.is_set():
                        finish = "cancelled"
                        break
                else:  # the engine ended the request before its budget (cancelled, or stopped with the model)
                    if from_engine is not None and from_engine.ended:
                        finish = "cancelled"
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        # Built here, raised below: leaving the except block drops the traceback and with it the frames that
        # hold this step's activations, so the memory can actually be given back first.
        failure = GenerationOutOfMemoryError(
            f"out of memory on {loaded.device} while generating ({first_sentences(e)}), with a {len(prompt)}-token "
            f"prompt after {len(token_ids)} new token(s). Try a shorter conversation or a smaller max_tokens (now "
            f"{opts.max_tokens}), unload models you no longer use, or let a training run on the same device finish "
            f"first. {loaded.model_id} is still loaded and usable.")
    finally:
        if tokens is not None:
            tokens.close()  # the plain loop's KV cache is the bulk of what generation holds
        if from_engine is not None:
            from_engine.close()  # the engine's row ends at its next step
    if failure is not None:
        free_memory()
        raise failure

    if finish != "stop_string":
        tail = stops.push(detok.flush())
        finish = "stop_string" if stops.hit is not None else finish
        tail += stops.flush()
    deliver(tail, final=True)
    ended = time.perf_counter()
    n = len(token_ids)
    if n > 1 and t_last > t_first:
        speed = (n - 1) / (t_last - t_first)
    else:
        speed = n / max(ended - started, 1e-9)
    if finish == "stop" and parser.tool_calls:
        finish = "tool_calls"
    return GenerationResult(
        text="".join(pieces),
        token_ids=token_ids,
        finish_reason=finish,
        prompt_tokens=len(prompt),
        completion_tokens=n,
        ttft_ms=round((t_first - started) * 1000, 3) if t_first is not None else 0.0,
        duration_ms=round((ended - started) * 1000, 3),
        tokens_per_s=round(speed, 3),
        reasoning=parser.reasoning,
        reasoning_tokens=reasoning_tokens,
        reasoning_ms=round((reasoning_end - t_first) * 1000, 3) if reasoning_end and t_first else 0.0,
        tool_calls=[c.to_dict() for c in parser.tool_calls],
        tool_call_errors=[m.to_dict() for m in parser.malformed],
    )
