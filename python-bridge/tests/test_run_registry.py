"""The worker's record of training runs: bounded history, replay then live events, watches that end cleanly."""

from __future__ import annotations

import threading

import pytest

from qwenbook_bridge.run_registry import FINISHED_KEPT, HISTORY_CAP, RunRegistry


def _progress(step: int) -> dict[str, int]:
    return {"step": step, "total_steps": 10_000}


def test_history_is_capped_and_keeps_train_begin() -> None:
    reg = RunRegistry()
    run = reg.begin("r1", "m", "/out", "s")
    reg.record(run, "train_begin", {"total_steps": 10_000, "start_step": 0})
    for step in range(1, HISTORY_CAP + 501):
        reg.record(run, "train_progress", _progress(step))
    reg.end(run, "completed")
    seen: list[tuple[str, dict]] = []
    info = reg.watch("r1", lambda kind, event: seen.append((kind, event)), threading.Event())
    assert seen[0][0] == "train_begin"
    assert len(seen) == HISTORY_CAP + 1
    assert seen[1][1]["step"] == 501 and seen[-1][1]["step"] == HISTORY_CAP + 500
    assert info == {"run_id": "r1", "model_id": "m", "output_dir": "/out", "session": "s", "started": info["started"],
                    "state": "completed", "step": HISTORY_CAP + 500, "total_steps": 10_000}


def test_watch_replays_then_follows_until_the_run_ends() -> None:
    reg = RunRegistry()
    run = reg.begin("r1", "m", "/out", "s")
    reg.record(run, "train_progress", _progress(1))
    seen: list[int] = []
    first_seen = threading.Event()

    def emit(kind: str, event: dict) -> None:
        seen.append(event["step"])
        first_seen.set()

    result: dict = {}
    t = threading.Thread(target=lambda: result.update(reg.watch("r1", emit, threading.Event())))
    t.start()
    assert first_seen.wait(5)
    for step in range(2, 6):
        reg.record(run, "train_progress", _progress(step))
    reg.end(run, "cancelled")
    t.join(5)
    assert seen == [1, 2, 3, 4, 5]
    assert result["state"] == "cancelled"


def test_a_cancelled_watch_ends_and_the_run_keeps_recording() -> None:
    reg = RunRegistry()
    run = reg.begin("r1", "m", "/out", "s")
    cancel = threading.Event()
    cancel.set()
    assert reg.watch("r1", lambda *_: None, cancel)["state"] == "running"
    assert run.watchers == []
    reg.record(run, "train_progress", _progress(7))
    assert reg.list()[0]["step"] == 7


def test_unknown_run_and_forgotten_finished_runs() -> None:
    reg = RunRegistry()
    with pytest.raises(KeyError, match="no training run 'nope'"):
        reg.watch("nope", lambda *_: None, threading.Event())
    for i in range(FINISHED_KEPT + 5):
        reg.end(reg.begin(f"r{i}", "m", "/out", "s"), "completed")
    live = reg.begin("live", "m", "/out", "s")
    ids = [r["run_id"] for r in reg.list()]
    assert len(ids) == FINISHED_KEPT + 1 and ids[-1] == live.run_id and "r0" not in ids
