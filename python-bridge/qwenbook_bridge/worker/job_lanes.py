"""Which thread runs a job: the shared job thread, or a thread of its own for long jobs such as training.

A long job must not hold up work on other models, so it gets its own thread. Work for the model it is using
(a chat, an export, an unload) would race with it, so such requests wait, in the order they came, and go to the
job thread once the long job has ended. Everything here runs on the job thread except the long jobs themselves,
which only report back through the job queue (`ModelFree`), so no locks are needed.

Concurrent jobs (chats, which the model's chat engine batches) also get a thread of their own, but leave their
model free for other work: they wait only for a long job on it. The handlers keep them apart from other work
on the same model where it matters.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class Push(Protocol):
    def send_multipart(self, frames: list[bytes]) -> Any: ...
    def close(self) -> None: ...


class Job(Protocol):
    @property
    def request(self) -> Any: ...


@dataclass(frozen=True)
class ModelFree:
    """Put on the job queue by a long job's thread when it ends: its model takes other work again."""

    model_id: str


def model_of(job: Job) -> str | None:
    model_id = job.request.content.get("model_id")
    return model_id if isinstance(model_id, str) else None


class JobLanes:
    def __init__(self, run_job: Callable[[Any, Push], None], open_push: Callable[[], Push],
                 background: frozenset[str], requeue: Callable[[ModelFree], None],
                 concurrent: frozenset[str] = frozenset()) -> None:
        self._run_job = run_job
        self._open_push = open_push  # each thread needs its own socket
        self._background = background
        self._concurrent = concurrent
        self._requeue = requeue
        self._busy: dict[str, threading.Thread] = {}
        self._waiting: dict[str, list[Any]] = {}
        self._threads: list[threading.Thread] = []

    def dispatch(self, job: Job, push: Push) -> None:
        """Run `job` now on this thread, start it on its own thread, or hold it until its model is free."""
        model = model_of(job)
        if model is not None and model in self._busy:
            self._waiting.setdefault(model, []).append(job)
            return
        kind = job.request.msg_type
        if kind not in self._background and kind not in self._concurrent:
            self._run_job(job, push)
            return
        long = kind in self._background
        thread = threading.Thread(target=self._run_alone, args=(job, model if long else None), name=f"qwenbook-{kind}",
                                  daemon=True)
        if model is not None and long:
            self._busy[model] = thread
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def release(self, free: ModelFree, push: Push) -> None:
        """A long job ended: run what waited for its model (a waiting long job makes the rest wait again)."""
        self._busy.pop(free.model_id, None)
        for job in self._waiting.pop(free.model_id, []):
            self.dispatch(job, push)

    def finish(self, push: Push, grace_s: float) -> None:
        """The worker is stopping (every job was cancelled): wait for long jobs to write what they keep, then
        answer the jobs that waited for them, which end at once now."""
        deadline = time.monotonic() + grace_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for model, jobs in list(self._waiting.items()):
            owner = self._busy.get(model)
            if owner is not None and owner.is_alive():
                continue  # still running: the model is not safe to touch
            del self._waiting[model]
            for job in jobs:
                self._run_job(job, push)

    def _run_alone(self, job: Job, model: str | None) -> None:
        push = self._open_push()
        try:
            self._run_job(job, push)
        finally:
            push.close()
            if model is not None:
                self._requeue(ModelFree(model))
