"""A request submitted to the batch scheduler: its events (text deltas, then one Finished) and its handle."""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from qwenbook_bridge.engine.generate.sampling import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class TokenDelta:
    """New reply text; empty while a multi-byte character or a possible stop string is held back."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    """The last event of a request. `completion_tokens` counts every generated token, an end token too."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


GenerationEvent = TokenDelta | Finished
EventSink = Callable[[GenerationEvent], None]


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


_ids = itertools.count(1)


class RequestHandle:
    """One submitted request. Events go to the sink given to `submit`, or else to an internal queue
    read by `events()` / `result()`."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: EventSink | None) -> None:
        self.id = next(_ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self._queue: queue.Queue[GenerationEvent] | None = None if sink else queue.Queue()
        self._sink: EventSink = sink or self._queue.put  # type: ignore[union-attr]
        self._cancelled = threading.Event()
        self.done = threading.Event()

    def cancel(self) -> None:
        """Stop generating for this request at the next step; its events end with Finished('cancelled')."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def events(self, timeout: float | None = None) -> Iterator[GenerationEvent]:
        """Events until Finished; `timeout` bounds the wait for each one (queue.Empty when it passes)."""
        if self._queue is None:
            raise RuntimeError("this request was submitted with its own event sink; read its events there")
        while True:
            ev = self._queue.get(timeout=timeout)
            yield ev
            if isinstance(ev, Finished):
                return

    def result(self, timeout: float | None = None) -> Completion:
        text: list[str] = []
        ids: list[int] = []
        for ev in self.events(timeout):
            if isinstance(ev, TokenDelta):
                text.append(ev.text)
                ids.extend(ev.token_ids)
            else:
                return Completion("".join(text), tuple(ids), ev.finish_reason, ev.prompt_tokens,
                                  ev.completion_tokens, ev.error)
        raise AssertionError("events() always ends with Finished")

    def _emit(self, ev: GenerationEvent) -> None:
        if isinstance(ev, Finished):
            self.done.set()
        try:
            self._sink(ev)
        except Exception:  # a broken consumer must not take the batch down; nobody is listening any more
            self._cancelled.set()
