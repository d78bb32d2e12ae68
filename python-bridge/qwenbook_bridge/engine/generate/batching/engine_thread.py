"""The thread both batch engines are built on (scheduler.BatchScheduler here, paged.scheduler.PagedEngine): it
owns the model, runs functions between two steps, parks for `exclusive()`, samples each row with its own
options, finishes rows through the detokenizer and the stop filter, and counts the tokens/s rate.

An engine subclasses `EngineThread` and keeps only its own admission, step and cache logic: `_step()` (admit
and run one step), `_clear_rows()` (drop every row and its cache) and `_cancel_waiting()` (end a request that
never started)."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch

from qwenbook_bridge.engine.models.loading import eos_token_ids as model_eos_ids
from qwenbook_bridge.engine.errors import EngineError, InvalidOptionError
from qwenbook_bridge.engine.generate.batching.requests import Finished, FinishReason, RequestHandle, TokenDelta
from qwenbook_bridge.engine.generate.sampling import RequestSampler, apply_penalties, sample_batch
from qwenbook_bridge.engine.generate.streaming import IncrementalDetokenizer, StopStringFilter


class ThreadConfig(Protocol):
    """What the thread reads of an engine's config."""

    @property
    def context_length(self) -> int | None: ...

    @property
    def rate_window_s(self) -> float: ...


@dataclass(eq=False)
class Row:
    """A request being decoded, as the thread samples and finishes it; each engine adds its cache's fields."""

    handle: RequestHandle
    detok: IncrementalDetokenizer
    stops: StopStringFilter
    sampler: RequestSampler  # its `seed` is what the row draws with
    prompt: torch.Tensor  # for the repetition penalty
    limit: int  # tokens this reply may have
    # Keyword-only, so that an engine's own fields without defaults may follow in its row.
    output: list[int] = field(default_factory=list, kw_only=True)
    finished: bool = field(default=False, kw_only=True)


RowT = TypeVar("RowT", bound=Row)
WaitT = TypeVar("WaitT")


class EngineThread(Generic[RowT, WaitT]):
    """One thread that owns the model and decodes the rows in `_rows`; `_waiting` holds what has not started."""

    _thread_name = "qwenbook-engine"

    def __init__(self, model: Any, tokenizer: Any, config: ThreadConfig, eos_token_ids: frozenset[int] | None,
                 kind: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        mcfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        kinds = set(getattr(mcfg, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise EngineError(f"{kind} supports full-attention models only; this model has "
                              f"{', '.join(sorted(kinds))} layers")
        self._text_config = mcfg
        self.context_length = int(config.context_length or getattr(mcfg, "max_position_embeddings", 0) or 32768)
        self.eos_token_ids = eos_token_ids if eos_token_ids is not None else model_eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self._waiting: collections.deque[WaitT] = collections.deque()
        self._rows: list[RowT] = []
        self._calls: collections.deque[tuple[Callable[[], Any], Future[Any]]] = collections.deque()
        self._wake = threading.Condition()
        self._pause_requests = 0
        self._parked = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._steps = 0
        self._peak = 0
        self._tokens = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._started = time.monotonic()
        self._last_error: str | None = None

    # ---- what each engine supplies ---------------------------------------------------------------

    def _step(self) -> None:
        """Admit what can start and run one step over the rows."""
        raise NotImplementedError

    def _clear_rows(self) -> None:
        """Drop every row (all finished by now) and free its cache."""
        raise NotImplementedError

    def _cancel_waiting(self, item: WaitT) -> None:
        """End a request that never started, at shutdown."""
        raise NotImplementedError

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self.running:
            return
        self._stopping = False
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name=self._thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Cancel every request (running or waiting) and end the thread; the model (and any cache) stays."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread:
            self._thread.join(timeout)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- public API ------------------------------------------------------------------------------

    def call_between_steps(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn()` on the engine thread between two steps; the Future holds its result.
        With the engine stopped, or called from the engine thread, `fn` runs at once."""
        fut: Future[Any] = Future()
        if not self.running or threading.current_thread() is self._thread:
            _run_into(fn, fut)
            return fut
        with self._wake:
            self._calls.append((fn, fut))
            self._wake.notify_all()
        return fut

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Park the engine between two steps for the duration of the block, so the caller may use the model
        (or change it: load an adapter, train) without racing the batch. Waits at most one step. An engine
        that caches prefixes drops them afterwards, since the block may have changed what the model computes."""
        if not self.running or threading.current_thread() is self._thread:
            yield
            return
        with self._wake:
            self._pause_requests += 1
            self._wake.notify_all()
        try:
            while not self._parked.wait(0.05):
                if not self.running:
                    break
            yield
        finally:
            with self._wake:
                self._pause_requests -= 1
                self._wake.notify_all()

    def _check_prompt(self, prompt_ids: list[int]) -> None:
        """Refuse a prompt that leaves no room for a token to be generated."""
        if not prompt_ids:
            raise InvalidOptionError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= self.context_length:
            raise InvalidOptionError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context holds {self.context_length}: "
                "shorten it so that at least one token can be generated")

    def _rate(self) -> float:
        """Tokens per second over the last `rate_window_s`."""
        now = time.monotonic()
        window = [n for t, n in list(self._recent) if now - t <= self.config.rate_window_s]
        # Right after start the window is not full yet; dividing by all of it would understate the rate.
        span = max(min(self.config.rate_window_s, now - self._started), 1e-3)
        return round(sum(window) / span, 1)

    # ---- the engine thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._stopping or self._rows or self._waiting or self._calls or self._pause_requests):
                        self._wake.wait()
                    if self._stopping:
                        break
                    calls = list(self._calls)
                    self._calls.clear()
                for fn, fut in calls:
                    _run_into(fn, fut)
                self._park_if_asked()
                if self._stopping:  # stop() ended a park: the block that parked us may still be using the model
                    break
                try:
                    self._step()
                except Exception as exc:  # a failed step (e.g. out of memory) ends its rows, not the server
                    self._fail_all(exc)
            self._shutdown()

    def _park_if_asked(self) -> bool:
        """Wait while `exclusive()` blocks run; says whether the thread parked."""
        parked = False
        with self._wake:
            while self._pause_requests and not self._stopping:
                parked = True
                self._parked.set()
                self._wake.wait()
            self._parked.clear()
        return parked

    def _sample(self, logits: torch.Tensor, rows: list[RowT]) -> list[int]:
        # Penalties read each row's own history, so penalized rows are penalized one by one; then one batched
        # draw covers every row, each at its own seed and step (the reply's length so far), so a row draws the
        # same tokens as its request would alone.
        params = [r.handle.params for r in rows]
        if any(p.penalized for p in params):
            logits = logits.float().clone()  # written in place: never the model's (or a captured graph's) buffer
            for row_logits, r, p in zip(logits, rows, params):
                if p.penalized:
                    apply_penalties(row_logits, p, r.prompt, r.output)
        tokens = sample_batch(logits, params, [r.sampler.seed for r in rows], [len(r.output) for r in rows])
        return tokens.tolist()

    def _advance(self, row: RowT, token: int) -> bool:
        """Record a sampled token, emit its text, and say whether the row has finished."""
        h, params = row.handle, row.handle.params
        row.output.append(token)
        if h.cancelled:
            return self._finish(row, "cancelled")
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return self._finish(row, "stop", self._tail(row))
        text = row.stops.push(row.detok.push(token))
        if row.stops.hit is not None:
            return self._finish(row, "stop", text, token)
        if len(row.output) >= row.limit:
            text += self._tail(row)
            return self._finish(row, "stop" if row.stops.hit is not None else "length", text, token)
        h._emit(TokenDelta(text, (token,)))
        return False

    @staticmethod
    def _tail(row: Row) -> str:
        """Text still held back when a row ends without a stop string: the detokenizer's and the stop filter's."""
        text = row.stops.push(row.detok.flush())
        return text if row.stops.hit is not None else text + row.stops.flush()

    def _finish(self, row: Row, reason: FinishReason, text: str = "", token: int | None = None) -> bool:
        if text or token is not None:
            row.handle._emit(TokenDelta(text, () if token is None else (token,)))
        row.finished = True
        row.handle._emit(Finished(reason, len(row.handle.prompt_ids), len(row.output)))
        return True

    def _finish_cancelled_rows(self) -> None:
        for r in self._rows:
            if not r.finished and r.handle.cancelled:
                self._finish(r, "cancelled")

    def _fail_all(self, exc: Exception) -> None:
        self._record_error(exc)
        message = f"{type(exc).__name__}: {exc}"
        for r in self._rows:
            if not r.finished:
                r.finished = True
                r.handle._emit(Finished("error", len(r.handle.prompt_ids), len(r.output), message))
        self._clear_rows()

    def _shutdown(self) -> None:
        for r in self._rows:
            if not r.finished:
                self._finish(r, "cancelled")
        self._clear_rows()
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
            calls = list(self._calls)
            self._calls.clear()
        for item in waiting:
            self._cancel_waiting(item)
        for fn, fut in calls:
            _run_into(fn, fut)

    def _record_error(self, exc: Exception) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"

    def _count_tokens(self, n: int) -> None:
        now = time.monotonic()
        self._tokens += n
        self._recent.append((now, n))
        while self._recent and now - self._recent[0][0] > self.config.rate_window_s:
            self._recent.popleft()


def _run_into(fn: Callable[[], Any], fut: Future[Any]) -> None:
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(fn())
    except BaseException as exc:  # handed to the caller through the Future
        fut.set_exception(exc)
