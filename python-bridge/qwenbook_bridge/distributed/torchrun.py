"""Starting a data-parallel run (distributed/rank.py) under torchrun as a supervised child process.

The worker calls `launch` on its job thread: rank 0's events are relayed as they are written, cancel stops the
ranks through torchrun (each rank finishes its step and rank 0 checkpoints), and a failed run raises with the
ranks' own last words rather than torchrun's report.
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
from typing import Any

import torch

from qwenbook_bridge.engine.errors import DeviceUnavailableError, EngineError, InvalidOptionError

EventSink = Callable[[str, dict[str, Any]], None]


class DistributedRunError(EngineError):
    """A several-rank run ended without completing; the message carries what the ranks said."""


def check_ranks(nproc: int) -> None:
    """Refuse a rank count this host cannot run: one GPU per rank when CUDA is there, any count on CPUs (gloo)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise InvalidOptionError(f"devices must be a whole number of ranks (1 or more), got {nproc!r}")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if nproc > count:
            raise DeviceUnavailableError(f"asked for {nproc} GPUs, this worker sees {count} "
                                         f"(cuda:0..cuda:{count - 1}); ask for {count} or fewer")


def _relay(path: Path, offset: int, on_event: EventSink, strategy: str = "ddp") -> int:
    """Hand on the complete lines written to `path` since `offset`; returns the new offset."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return offset
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
    for line in data[:end].splitlines():
        event = json.loads(line)
        on_event(event["kind"], {**event["content"], "world_size": event["world_size"], "strategy": strategy}
                 if event["kind"] == "train_begin" else event["content"])
    return offset + end


def launch(run: dict[str, Any], nproc: int, workdir: Path, on_event: EventSink | None = None,
           cancel: threading.Event | None = None, poll_s: float = 0.2) -> dict[str, Any]:
    """Run `run` (dist_train's run file, without "events") on `nproc` ranks; returns rank 0's TrainResult dict."""
    check_ranks(nproc)
    strategy = str(run.get("strategy", "ddp"))
    workdir.mkdir(parents=True, exist_ok=True)
    events = workdir / "events.jsonl"
    events.unlink(missing_ok=True)
    spec = workdir / "run.json"
    spec.write_text(json.dumps({**run, "events": str(events)}, ensure_ascii=False), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", "-m", "qwenbook_bridge.distributed.rank", str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # Both pipes are drained on threads so a chatty rank cannot block on a full pipe.
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.extend(s), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for r in readers:
        r.start()
    offset, stopping = 0, False
    relay = on_event or (lambda kind, content: None)
    while proc.poll() is None:
        offset = _relay(events, offset, relay, strategy)
        if cancel is not None and cancel.is_set() and not stopping:
            proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
            stopping = True
        time.sleep(poll_s)
    for r in readers:
        r.join()
    _relay(events, offset, relay, strategy)
    results = [json.loads(line) for line in out if line.startswith('{"kind": "result"')]
    if results and (proc.returncode == 0 or (stopping and results[-1]["content"]["status"] == "cancelled")):
        return results[-1]["content"]
    said = [line.strip() for line in err if line.startswith("qwenbook dist_train rank")]
    detail = "; ".join(dict.fromkeys(said)) or "".join(err[-20:]).strip() or "no output"
    raise DistributedRunError(f"the {nproc}-rank run ended with exit code {proc.returncode}: {detail}")
