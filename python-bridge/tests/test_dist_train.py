"""Data-parallel training under torchrun (gloo on CPU): the same run as one process, and a dead rank's end.

Tolerance: losses of the 2-rank run match the 1-process run with the same global batch within 1e-4 (fp32);
they differ only in the order gradients are summed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch

from qwenbook_bridge.distributed.torchrun import DistributedRunError, check_ranks, launch
from qwenbook_bridge.engine.train import checkpoints as ckpt
from qwenbook_bridge.engine.errors import DeviceUnavailableError, InvalidOptionError
from qwenbook_bridge.engine.data.datasets import DatasetSpec
from qwenbook_bridge.engine.train.loop import train
from qwenbook_bridge.engine.train.config import TrainConfig

ROWS = [{"instruction": f"问题{i}", "output": f"回答{i}号，" * (1 + i % 3)} for i in range(16)]
TOLERANCE = 1e-4


def settings(out: Path, **extra) -> dict:
    base = dict(output_dir=str(out), max_length=48, batch_size=2, grad_accum=1, max_steps=4, lr=1e-3,
                lora={"r": 4}, log_every=1, seed=7)
    base.update(extra)
    return base


def write_run(tmp: Path, model_dir: Path, train_settings: dict) -> Path:
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    run = tmp / "run.json"
    run.write_text(json.dumps({"model": str(model_dir), "dtype": "fp32", "datasets": [{"path": str(data)}],
                               "train": train_settings, "events": str(tmp / "events.jsonl")}), encoding="utf-8")
    return run


def torchrun(run: Path, nproc: int = 2) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", "-m", "qwenbook_bridge.distributed.rank", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def one_process(model_dir: Path, data: Path, config: dict, last_step: int | None = None) -> dict[int, float]:
    """Step -> loss of a one-process run (with a resumed run, the checkpoint's earlier steps too), cancelled
    once it reports `last_step` if given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cancel, on_event = cancel_after(last_step) if last_step is not None else (None, None)
    result = train(model, tok, [DatasetSpec(str(data))], TrainConfig.from_dict(config), on_event=on_event,
                   cancel=cancel)
    assert last_step is None or result.step == last_step
    return {h["step"]: h["loss"] for h in result.history if h["kind"] == "train_progress"}


def test_rank_counts_are_checked_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="whole number of ranks"):
        check_ranks(0)
    if torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match=f"asked for {torch.cuda.device_count() + 1} GPUs"):
            check_ranks(torch.cuda.device_count() + 1)


def test_more_gpus_than_the_host_has_are_refused_with_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_ranks(2)
    with pytest.raises(DeviceUnavailableError, match=r"asked for 3 GPUs, this worker sees 2 \(cuda:0..cuda:1\); ask for 2"):
        check_ranks(3)


def test_a_run_that_cannot_start_says_why(tmp_path: Path) -> None:
    run = {"model": str(tmp_path / "missing"), "datasets": [{"path": "x.jsonl"}],
           "train": {"output_dir": str(tmp_path / "out")}}
    # One rank: its words reach the launcher the same way from any rank, and each rank is a process importing torch.
    with pytest.raises(DistributedRunError, match=r"1-rank run ended with exit code .*does not exist"):
        launch(run, 1, tmp_path / "launch")


def test_two_ranks_match_one_process_then_cancel_at_one_step_with_a_checkpoint(tmp_path: Path,
                                                                              tiny_model_dir: Path) -> None:
    run = json.loads(write_run(tmp_path, tiny_model_dir, settings(tmp_path / "ddp", max_steps=400)).read_text())
    del run["events"]
    seen, cancel, on_event = recording_cancel()
    result = launch(run, 2, tmp_path / "launch", on_event=on_event, cancel=cancel)
    assert_two_ranks_match_one_process_then_cancel(result, seen, tmp_path, tiny_model_dir)


CANCEL_AT = 4  # the compared runs are cancelled once they report this step


def recording_cancel() -> tuple[list[tuple[str, dict]], threading.Event, Callable[[str, dict], None]]:
    """Events seen, a cancel event, and a sink that records every event and cancels at CANCEL_AT."""
    seen: list[tuple[str, dict]] = []
    cancel, cancel_on = cancel_after(CANCEL_AT)

    def on_event(kind: str, content: dict) -> None:
        seen.append((kind, content))
        cancel_on(kind, content)

    return seen, cancel, on_event


def assert_two_ranks_match_one_process_then_cancel(result: dict, seen: list[tuple[str, dict]], tmp_path: Path,
                                                   tiny_model_dir: Path) -> None:
    """A 2-rank run of settings(tmp_path / "ddp", max_steps=400) that recording_cancel cancelled: every rank stopped
    at one step with a checkpoint there, and each step's loss is that of one process with the same global batch
    (and the same 400-step schedule) stopped at the same step. One launch proves both, as a launch is most of the
    cost."""
    stopped = result["step"]
    assert result["status"] == "cancelled" and CANCEL_AT <= stopped < 400
    last = ckpt.list_checkpoints(tmp_path / "ddp")[-1]
    assert ckpt.read_trainer_state(last)["step"] == stopped
    assert (last / "adapter_model.safetensors").is_file()
    begin = next(c for k, c in seen if k == "train_begin")
    assert begin["rows_per_step"] == 2 * 1 * 2 and begin["world_size"] == 2  # batch × grad_accum × ranks
    ranked = {c["step"]: c["loss"] for k, c in seen if k == "train_progress"}

    reference = one_process(tiny_model_dir, tmp_path / "data.jsonl",
                            settings(tmp_path / "one", grad_accum=2, max_steps=400), last_step=stopped)
    assert list(ranked) == list(reference) == list(range(1, stopped + 1))
    assert max(abs(ranked[s] - reference[s]) for s in reference) < TOLERANCE, (ranked, reference)
    assert reference[CANCEL_AT] < reference[1]  # it learns, so matching curves are not two flat lines


def cancel_after(step: int) -> tuple[threading.Event, Callable[[str, dict], None]]:
    """A cancel event and an event sink that sets it once training reports `step`."""
    cancel = threading.Event()

    def on_event(kind: str, content: dict) -> None:
        if kind == "train_progress" and content["step"] >= step:
            cancel.set()

    return cancel, on_event


def _rank_process(parent: psutil.Process, rank: str) -> psutil.Process | None:
    for child in parent.children(recursive=True):
        try:
            if child.environ().get("RANK") == rank and "qwenbook_bridge.distributed.rank" in " ".join(child.cmdline()):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_a_killed_rank_ends_the_run_and_its_checkpoint_resumes_on_one_process(tmp_path: Path,
                                                                              tiny_model_dir: Path) -> None:
    out_dir = tmp_path / "ddp"
    run = write_run(tmp_path, tiny_model_dir, settings(out_dir, max_steps=400, save_every=2))
    proc = torchrun(run)
    deadline = time.monotonic() + 180
    while not ckpt.list_checkpoints(out_dir):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.05)
    victim = _rank_process(psutil.Process(proc.pid), "1")
    assert victim is not None
    victim.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "another rank stopped (its process died or was killed)" in err, err[-3000:]
    assert "resume it with resume_from" in err

    last = ckpt.list_checkpoints(out_dir)[-1]
    step = ckpt.read_trainer_state(last)["step"]
    assert 2 <= step < 400
    # The checkpoint holds the global setup (grad_accum × world size), so one process carries it on.
    saved = json.loads((last / "train_config.json").read_text(encoding="utf-8"))
    assert saved["grad_accum"] == 2
    resumed = one_process(tiny_model_dir, tmp_path / "data.jsonl",
                          settings(out_dir, grad_accum=2, max_steps=step + 2, resume_from=str(last)))
    assert list(resumed)[-3:] == [step, step + 1, step + 2]
