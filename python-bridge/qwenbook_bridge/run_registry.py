"""Training runs the worker knows about, so that a restarted kernel can list them and re-attach.

A run is the `train` request that started it (its msg_id is the run id). Its events are kept in a bounded
history: the `train_begin` always (a dashboard needs it to draw anything), then the latest
`train_progress`/`eval`/`checkpoint` events up to a cap, so an overnight run costs a fixed amount of memory.
A watcher gets the history, then every later event, until the run ends or the watcher is cancelled;
cancelling a watcher never touches the run.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

HISTORY_CAP = 2000  # events kept per run beyond train_begin (about 0.5 MB at most)
FINISHED_KEPT = 32  # finished runs listed; older ones are forgotten
_WAKE_S = 0.25  # how often a watcher with nothing to send checks its cancel flag

Event = tuple[str, dict[str, Any]]
_END = ("", {})


@dataclass
class Run:
    run_id: str
    model_id: str
    output_dir: str
    session: str
    started: str
    state: str = "running"  # running | completed | cancelled | failed
    step: int = 0
    total_steps: int | None = None
    error: str | None = None
    begin: Event | None = None
    history: deque[Event] = field(default_factory=lambda: deque(maxlen=HISTORY_CAP))
    watchers: list[queue.SimpleQueue[Event]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"run_id": self.run_id, "model_id": self.model_id, "output_dir": self.output_dir,
                             "session": self.session, "started": self.started, "state": self.state, "step": self.step}
        if self.total_steps is not None:
            d["total_steps"] = self.total_steps
        if self.error is not None:
            d["error"] = self.error
        return d


class RunRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, Run] = {}

    def begin(self, run_id: str, model_id: str, output_dir: str, session: str) -> Run:
        run = Run(run_id, model_id, output_dir, session, datetime.now(timezone.utc).isoformat())
        with self._lock:
            self._runs[run_id] = run
            finished = [r for r in self._runs.values() if r.state != "running"]
            for old in finished[: max(0, len(finished) - FINISHED_KEPT)]:
                del self._runs[old.run_id]
        return run

    def record(self, run: Run, kind: str, event: dict[str, Any]) -> None:
        with self._lock:
            if kind == "train_begin":
                run.begin = (kind, event)
                run.total_steps = event.get("total_steps", run.total_steps)
                run.step = event.get("start_step", run.step)
            else:
                run.history.append((kind, event))
                if isinstance(event.get("step"), int):
                    run.step = max(run.step, event["step"])
            for w in run.watchers:
                w.put((kind, event))

    def end(self, run: Run, state: str, error: str | None = None) -> None:
        with self._lock:
            run.state, run.error = state, error
            for w in run.watchers:
                w.put(_END)
            run.watchers.clear()

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.to_dict() for r in self._runs.values()]

    def watch(self, run_id: str, emit: Callable[[str, dict[str, Any]], None], cancel: threading.Event) -> dict[str, Any]:
        """Send `run_id`'s history, then its live events until it ends or `cancel` is set; returns the run."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                known = ", ".join(self._runs) or "none"
                raise KeyError(f"no training run {run_id!r} in this worker (runs: {known}); list them with qwen.runs()")
            replay = ([run.begin] if run.begin else []) + list(run.history)
            inbox: queue.SimpleQueue[Event] | None = None
            if run.state == "running":
                inbox = queue.SimpleQueue()
                run.watchers.append(inbox)
        try:
            for kind, event in replay:
                emit(kind, event)
            while inbox is not None and not cancel.is_set():
                try:
                    item = inbox.get(timeout=_WAKE_S)
                except queue.Empty:
                    continue
                if item is _END:
                    break
                emit(*item)
        finally:
            if inbox is not None:
                with self._lock:
                    if inbox in run.watchers:
                        run.watchers.remove(inbox)
        with self._lock:
            return run.to_dict()
