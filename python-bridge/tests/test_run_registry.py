"""The worker's record of training runs: bounded history, replay then live events, watches that end cleanly."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading

import pytest

from qwenbook_bridge.handlers.run_registry import FINISHED_KEPT, HISTORY_CAP, RunIndex, RunRegistry


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
                    "ended": info["ended"], "state": "completed", "step": HISTORY_CAP + 500, "total_steps": 10_000}


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


# ------------------------------------------------------------ the on-disk run index


def _checkpoint(output_dir, step: int, complete: bool = True):
    """A checkpoint-<step> folder as engine/train/checkpoints.py writes it (complete: both state files)."""
    from qwenbook_bridge.engine.train.checkpoints import TRAINER_STATE, TRAINING_STATE

    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / TRAINER_STATE).write_text("{}")
    if complete:
        (folder / TRAINING_STATE).write_bytes(b"state")
    return folder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


RECIPE = {"load": {"model": "/models/tiny", "dtype": "fp32", "device": "cpu"},
          "train": {"config": {"output_dir": "/out", "max_steps": 8}, "datasets": [{"path": "/data.json"}]}}


def test_the_index_records_a_run_at_begin_checkpoint_and_end(tmp_path) -> None:
    index = RunIndex(tmp_path / "runs")
    index.folder.mkdir(mode=0o700)
    reg = RunRegistry()
    assert reg.open_index(index) == []
    run = reg.begin("r1", "m", str(tmp_path / "out"), "s", resume=RECIPE)
    on_disk = json.loads(index.path("r1").read_text())
    assert on_disk["state"] == "running" and on_disk["resume"] == RECIPE and on_disk["worker_pid"] == os.getpid()
    assert stat.S_IMODE(index.path("r1").stat().st_mode) == 0o600
    reg.record(run, "train_progress", _progress(3))
    assert json.loads(index.path("r1").read_text())["step"] == 0  # progress alone is not worth a disk write
    reg.record(run, "checkpoint", {"step": 4, "path": "/out/checkpoint-4", "reason": "periodic"})
    on_disk = json.loads(index.path("r1").read_text())
    assert (on_disk["step"], on_disk["checkpoint"]) == (4, "/out/checkpoint-4")
    reg.end(run, "completed")
    on_disk = json.loads(index.path("r1").read_text())
    assert on_disk["state"] == "completed" and on_disk["ended"] >= on_disk["started"]
    assert [p.name for p in index.folder.iterdir()] == ["r1.json"]  # no temporaries left


def test_a_new_worker_lists_a_run_whose_worker_died_as_interrupted_at_its_last_complete_checkpoint(tmp_path) -> None:
    index = RunIndex(tmp_path / "runs")
    index.folder.mkdir()
    out = tmp_path / "out"
    crashed = RunRegistry()
    crashed.open_index(index)
    run = crashed.begin("r1", "m", str(out), "s", resume=RECIPE)
    run.worker_pid = _dead_pid()  # as if another process, since killed, had been training it
    _checkpoint(out, 2)
    crashed.record(run, "checkpoint", {"step": 2, "path": str(out / "checkpoint-2"), "reason": "periodic"})
    _checkpoint(out, 4)  # written, but the worker died before it could record it
    _checkpoint(out, 6, complete=False)  # cut short mid-copy: not a checkpoint to resume from
    finished = crashed.begin("r0", "m", str(tmp_path / "other"), "s")
    crashed.end(finished, "completed")

    fresh = RunRegistry()
    recovered = fresh.open_index(index)
    assert [r.run_id for r in recovered] == ["r1"]
    listed = {r["run_id"]: r for r in fresh.list()}
    assert listed["r0"]["state"] == "completed"
    assert listed["r1"]["state"] == "interrupted" and listed["r1"]["checkpoint"] == str(out / "checkpoint-4")
    assert listed["r1"]["step"] == 4 and listed["r1"]["resume"] == RECIPE and "ended" in listed["r1"]
    assert json.loads(index.path("r1").read_text())["state"] == "interrupted"  # so a third worker agrees

    # Resuming it (a train request with resume_from into the same folder) lists it as resumed by the new run.
    fresh.begin("r2", "m", str(out), "s2", resume=RECIPE, continues=True)
    listed = {r["run_id"]: r for r in fresh.list()}
    assert (listed["r1"]["state"], listed["r1"]["resumed_by"]) == ("resumed", "r2")
    assert json.loads(index.path("r1").read_text())["state"] == "resumed"


def test_an_interrupted_run_without_a_complete_checkpoint_has_none(tmp_path) -> None:
    index = RunIndex(tmp_path / "runs")
    index.folder.mkdir()
    out = tmp_path / "out"
    _checkpoint(out, 2, complete=False)
    reg = RunRegistry()
    reg.open_index(index)
    run = reg.begin("r1", "m", str(out), "s")
    run.worker_pid = _dead_pid()
    reg.record(run, "checkpoint", {"step": 2, "path": str(out / "checkpoint-2"), "reason": "periodic"})
    [info] = [r.to_dict() for r in RunRegistry().open_index(index)]
    assert info["state"] == "interrupted" and "checkpoint" not in info


def test_a_run_another_live_worker_is_training_is_left_to_it(tmp_path) -> None:
    index = RunIndex(tmp_path / "runs")
    index.folder.mkdir()
    reg = RunRegistry()
    reg.open_index(index)
    run = reg.begin("r1", "m", str(tmp_path / "out"), "s")
    other = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(120)", "qwenbook_bridge"])
    try:
        run.worker_pid = other.pid
        reg.record(run, "checkpoint", {"step": 2, "path": "/x", "reason": "periodic"})  # rewrites the record
        fresh = RunRegistry()
        assert fresh.open_index(index) == [] and fresh.list() == []
        assert json.loads(index.path("r1").read_text())["state"] == "running"
    finally:
        other.kill()
        other.wait()


def test_the_index_keeps_only_the_newest_finished_runs(tmp_path) -> None:
    index = RunIndex(tmp_path / "runs")
    index.folder.mkdir()
    reg = RunRegistry()
    reg.open_index(index)
    for i in range(FINISHED_KEPT + 5):
        reg.end(reg.begin(f"r{i:03d}", "m", "/out", "s"), "completed")
    names = sorted(p.stem for p in index.folder.iterdir())
    assert len(names) == FINISHED_KEPT and names[0] == "r005"
    assert [r.run_id for r in RunRegistry().open_index(index)] == [] and len(index.read_all()) == FINISHED_KEPT


def test_a_record_is_replaced_atomically(tmp_path, monkeypatch) -> None:
    index = RunIndex(tmp_path / "runs")
    index.folder.mkdir()
    reg = RunRegistry()
    reg.open_index(index)
    run = reg.begin("r1", "m", "/out", "s")
    before = index.path("r1").read_text()

    def crash(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    reg.record(run, "checkpoint", {"step": 2, "path": "/out/checkpoint-2", "reason": "periodic"})  # logged, not raised
    assert index.path("r1").read_text() == before and [p.name for p in index.folder.iterdir()] == ["r1.json"]
    monkeypatch.undo()
    (index.folder / "broken.json").write_text('{"version": 1, "run_id": ')  # a file from elsewhere, cut short
    assert [r.run_id for r in index.read_all()] == ["r1"]


def test_run_ids_cannot_name_files_outside_the_index(tmp_path) -> None:
    index = RunIndex(tmp_path / "runs")
    assert index.path("../../etc/passwd").parent == index.folder
    assert index.path("..").parent == index.folder


def test_a_train_request_with_huge_inline_rows_is_recorded_without_its_recipe(tmp_path) -> None:
    from qwenbook_bridge.handlers.run_registry import RESUME_RECIPE_MAX_BYTES

    index = RunIndex(tmp_path / "runs")
    index.folder.mkdir()
    reg = RunRegistry()
    reg.open_index(index)
    rows = [{"instruction": "q" * 1000, "output": "a"}] * (RESUME_RECIPE_MAX_BYTES // 1000 + 1)
    big = {**RECIPE, "train": {**RECIPE["train"], "datasets": [{"rows": rows}]}}
    reg.begin("r1", "m", "/out", "s", resume=big)
    record = index.path("r1").read_text()
    assert len(record) < 4096 and "resume" not in json.loads(record)  # the index stays small
    reg.begin("r2", "m", "/out", "s", resume=RECIPE)
    assert json.loads(index.path("r2").read_text())["resume"] == RECIPE
