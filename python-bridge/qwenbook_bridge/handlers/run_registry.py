"""Training runs the worker knows about, so that a restarted kernel can list them and re-attach.

A run is the `train` request that started it (its msg_id is the run id). Its events are kept in a bounded
history: the `train_begin` always (a dashboard needs it to draw anything), then the latest
`train_progress`/`eval`/`checkpoint` events up to a cap, so an overnight run costs a fixed amount of memory.
A watcher gets the history, then every later event, until the run ends or the watcher is cancelled;
cancelling a watcher never touches the run.

With an index (`open_index`, which the worker process sets up) every run also has a small JSON record on disk,
one file per run in a user-only folder beside the runtime file: what it trains, where, the request needed to
resume it, its state and its last complete checkpoint. Records are written atomically (temp file + rename) when a
run begins, writes a checkpoint and ends, so a worker killed at any moment leaves every record readable. A new
worker reads them: a run recorded as running whose worker is gone is listed as `interrupted`, with the newest
checkpoint that is complete on disk (engine/train/checkpoints.py), and can be resumed from it.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qwenbook_bridge.engine.files.atomic_write import write_private_json

HISTORY_CAP = 2000  # events kept per run beyond train_begin (about 0.5 MB at most)
FINISHED_KEPT = 32  # finished runs listed (and kept in the index); older ones are forgotten
RECORD_VERSION = 1
# A run's resume recipe holds its datasets, rows included when they were sent inline; past this size the record
# keeps no recipe (the run is still listed, and resumes from its checkpoint through the train builder).
RESUME_RECIPE_MAX_BYTES = 1024 * 1024
_RECORD_SUFFIX = ".json"
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
    # running | completed | cancelled | failed | interrupted (its worker died) | resumed (continued by another run)
    state: str = "running"
    step: int = 0
    total_steps: int | None = None
    error: str | None = None
    checkpoint: str | None = None  # the newest complete checkpoint-<step> folder
    ended: str | None = None
    # What continuing the run takes: {"load": load request of its model, "train": the train request}.
    resume: dict[str, Any] | None = None
    resumed_by: str | None = None  # the run that continued this interrupted one
    worker_pid: int = field(default_factory=os.getpid)
    begin: Event | None = None
    history: deque[Event] = field(default_factory=lambda: deque(maxlen=HISTORY_CAP))
    watchers: list[queue.SimpleQueue[Event]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"run_id": self.run_id, "model_id": self.model_id, "output_dir": self.output_dir,
                             "session": self.session, "started": self.started, "state": self.state, "step": self.step}
        if self.total_steps is not None:
            d["total_steps"] = self.total_steps
        for name in ("error", "checkpoint", "ended", "resume", "resumed_by"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return d

    def record(self) -> dict[str, Any]:
        """The run as its index file holds it."""
        return {"version": RECORD_VERSION, **self.to_dict(), "worker_pid": self.worker_pid}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Run:
        fields = ("run_id", "model_id", "output_dir", "session", "started")
        if data.get("version") != RECORD_VERSION or not all(isinstance(data.get(k), str) for k in fields):
            raise ValueError(f"not a version-{RECORD_VERSION} run record")
        run = cls(*(data[k] for k in fields))
        run.state = str(data.get("state", "running"))
        run.step = int(data.get("step", 0))
        run.total_steps = data.get("total_steps")
        run.error, run.checkpoint, run.ended = data.get("error"), data.get("checkpoint"), data.get("ended")
        run.resumed_by = data.get("resumed_by")
        run.resume = data.get("resume") if isinstance(data.get("resume"), dict) else None
        run.worker_pid = int(data.get("worker_pid", 0))
        return run


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _worker_alive(pid: int) -> bool:
    """Whether `pid` is a running qwenbook worker (a reused pid running something else is not)."""
    import psutil

    if pid <= 0 or not psutil.pid_exists(pid):
        return False
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and "qwenbook_bridge" in " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return False


def newest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-<step> folder in `output_dir` holding every file a resume reads, or None."""
    from qwenbook_bridge.engine.train.checkpoints import list_checkpoints

    found = list_checkpoints(Path(output_dir))
    return str(found[-1]) if found else None


class RunIndex:
    """One JSON file per run in `folder` (which the caller makes user-only), each replaced atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, run_id: str) -> Path:
        # run ids are msg_ids (uuids from our clients), but a client chooses them: keep the name a plain file name.
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)[:128].lstrip(".") or "_"
        return self.folder / f"{safe}{_RECORD_SUFFIX}"

    def write(self, run: Run) -> None:
        write_private_json(self.path(run.run_id), run.record())

    def remove(self, run_id: str) -> None:
        self.path(run_id).unlink(missing_ok=True)

    def read_all(self) -> list[Run]:
        """Every readable record, oldest start first; unreadable files and stale temporaries are skipped."""
        runs: list[Run] = []
        for p in self.folder.glob(f"*{_RECORD_SUFFIX}"):
            if p.name.startswith("."):
                continue
            try:
                runs.append(Run.from_record(json.loads(p.read_text(encoding="utf-8"))))
            except (OSError, ValueError, TypeError):
                continue
        return sorted(runs, key=lambda r: r.started)


class RunRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, Run] = {}
        self._index: RunIndex | None = None

    def open_index(self, index: RunIndex) -> list[Run]:
        """Keep records in `index` from now on, and list the runs it holds: finished ones as they ended, and
        runs recorded as running by a worker that is gone as interrupted at their newest complete checkpoint.
        Runs another live worker is training are left to it. Returns the runs found interrupted."""
        recovered: list[Run] = []
        with self._lock:
            self._index = index
            for run in index.read_all():
                if run.state == "running":
                    if _worker_alive(run.worker_pid):
                        continue
                    run.state, run.ended = "interrupted", run.ended or _now()
                    run.checkpoint = newest_complete_checkpoint(run.output_dir)
                    if run.checkpoint is not None:
                        run.step = int(Path(run.checkpoint).name.rsplit("-", 1)[1])
                    run.worker_pid = os.getpid()
                    index.write(run)
                    recovered.append(run)
                elif run.checkpoint is not None and newest_complete_checkpoint(run.output_dir) is None:
                    run.checkpoint = None  # deleted or moved since: nothing left to resume from
                self._runs[run.run_id] = run
            self._forget_old()
        return recovered

    def _forget_old(self) -> None:
        """Drop all but the newest FINISHED_KEPT finished runs, from memory and from the index (lock held)."""
        # Oldest end first: a long run that just ended is recent news, however early it started.
        finished = sorted((r for r in self._runs.values() if r.state != "running"), key=lambda r: r.ended or r.started)
        for old in finished[: max(0, len(finished) - FINISHED_KEPT)]:
            del self._runs[old.run_id]
            if self._index is not None:
                self._index.remove(old.run_id)

    def _save(self, run: Run) -> None:
        """Write the run's record (lock held); a failing disk must not fail the training run itself."""
        if self._index is None:
            return
        try:
            self._index.write(run)
        except OSError as e:
            import logging

            logging.getLogger("qwenbook.worker").warning("could not record run %s in %s: %s", run.run_id,
                                                         self._index.folder, e)

    def begin(self, run_id: str, model_id: str, output_dir: str, session: str,
              resume: dict[str, Any] | None = None, continues: bool = False) -> Run:
        """A run starts; `resume` is what continuing it takes, `continues` says it resumes from a checkpoint."""
        if resume is not None and len(json.dumps(resume, ensure_ascii=False)) > RESUME_RECIPE_MAX_BYTES:
            import logging

            logging.getLogger("qwenbook.worker").info(
                "run %s: its train request is over %d bytes (inline rows), so the run index records it without "
                "a resume recipe", run_id, RESUME_RECIPE_MAX_BYTES)
            resume = None
        run = Run(run_id, model_id, output_dir, session, _now(), resume=resume)
        with self._lock:
            previous = self._runs.pop(run_id, None)
            if previous is not None and previous.state == "running":
                self._runs[run_id] = previous
                raise ValueError(f"run {run_id} is already running")
            self._runs[run_id] = run
            if continues:
                # The interrupted run this one continues (same folder) is listed as resumed, not as still waiting.
                for other in self._runs.values():
                    if other.state == "interrupted" and other.output_dir == output_dir:
                        other.state, other.resumed_by = "resumed", run_id
                        self._save(other)
            self._forget_old()
            self._save(run)
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
            if kind == "checkpoint" and isinstance(event.get("path"), str):
                run.checkpoint = event["path"]
                self._save(run)
            for w in run.watchers:
                w.put((kind, event))

    def end(self, run: Run, state: str, error: str | None = None) -> None:
        with self._lock:
            run.state, run.error, run.ended = state, error, _now()
            self._save(run)
            self._forget_old()
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
