"""One rank of a data-parallel fine-tuning run on one host, started by torchrun:

    torchrun --nproc_per_node 2 -m qwenbook_bridge.distributed.rank run.json

run.json: {"model": "<folder or hub id>", "dtype": "auto", "strategy": "ddp" | "fsdp",
           "datasets": [{"path": "data.jsonl"} | {"rows": [...]} | {"self_cognition": {...}}, ...] (as in a train request),
           "train": {TrainConfig fields, grad_accum PER RANK}, "events": "<path for rank 0's events, JSON lines>"}

The global batch is batch_size × grad_accum × world size, and the run is exactly the one-process run with
grad_accum × world size (same steps, schedule and checkpoints), so a checkpoint resumes on one process.
"ddp" keeps a whole model on every rank and sums the trainable weights' gradients once per step (LoRA);
"fsdp" shards every decoder layer's weights, gradients and optimizer state over the ranks with FSDP2
(fully_shard), for full fine-tuning and for bases too large for one card.
Ranks talk over gloo on CPUs and nccl on GPUs (one GPU per rank, cuda:LOCAL_RANK). Rank 0 alone writes
checkpoints, the result and the events. When a rank dies, torchrun stops the others; rank 0 saves the last
completed step first when it can (see training.py) and every rank exits non-zero.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from qwenbook_bridge.engine import InvalidOptionError, LoadOptions, load_model
from qwenbook_bridge.engine.data.datasets import DatasetSpec
from qwenbook_bridge.engine.train.data_parallel import DataParallel
from qwenbook_bridge.engine.errors import EngineError
from qwenbook_bridge.engine.train.loop import train
from qwenbook_bridge.engine.train.config import TrainConfig

_KEYS = {"model", "dtype", "strategy", "datasets", "train", "events"}
STRATEGIES = ("ddp", "fsdp")


@dataclass
class DistRun:
    model: str
    dtype: str
    datasets: list[DatasetSpec]
    config: TrainConfig  # grad_accum per rank, as written in the file
    events: Path | None
    strategy: str = "ddp"

    def parallel(self, world: int) -> bool:
        """Whether the run trains as one of a group: several ranks, or FSDP2, which shards over the default
        group even when it is a group of one."""
        return world > 1 or self.strategy == "fsdp"

    @classmethod
    def read(cls, path: Path) -> DistRun:
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InvalidOptionError(f"cannot read the run file {path}: {e}") from e
        return cls.from_dict(spec, str(path))

    @classmethod
    def from_dict(cls, spec: Any, where: str) -> DistRun:
        """A run from its dict (a run file's contents); `where` names it in errors."""
        if not isinstance(spec, dict):
            raise InvalidOptionError(f"{where} must hold a JSON object with model, datasets and train")
        unknown = sorted(set(spec) - _KEYS)
        if unknown:
            raise InvalidOptionError(f"{where} has unknown keys {unknown}; allowed: {sorted(_KEYS)}")
        for key in ("model", "datasets", "train"):
            if key not in spec:
                raise InvalidOptionError(f"{where} has no {key!r}: a run needs model, datasets and train")
        if not isinstance(spec["datasets"], list) or not spec["datasets"]:
            raise InvalidOptionError(f"{where}: datasets must be a non-empty list of {{source, format, samples}}")
        datasets = []
        for i, d in enumerate(spec["datasets"]):
            if not isinstance(d, dict):
                raise InvalidOptionError(f"{where}: datasets[{i}] must be an object like a train request's, got {d!r}")
            datasets.append(DatasetSpec.from_dict(d))
        strategy = spec.get("strategy", "ddp")
        if strategy not in STRATEGIES:
            raise InvalidOptionError(f"{where}: strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        events = spec.get("events")
        return cls(str(spec["model"]), str(spec.get("dtype", "auto")), datasets, TrainConfig.from_dict(spec["train"]),
                   Path(events) if events else None, strategy)


class RankLostError(EngineError):
    """Another rank of the run died, so this one cannot go on."""


def _lost_peer_message(config: TrainConfig, world: int) -> str:
    from qwenbook_bridge.engine.train import checkpoints as ckpt

    saved = ckpt.list_checkpoints(Path(config.output_dir))
    where = (f"the last checkpoint is {saved[-1]}; resume it with resume_from, with grad_accum "
             f"{config.grad_accum // world} per rank on {world} ranks or grad_accum {config.grad_accum} on one process "
             "(the same global batch)") if saved else \
        "no checkpoint was written yet; start the run again"
    return f"another rank stopped (its process died or was killed), so the run ended; {where}"


def _rank_env() -> tuple[int, int, int]:
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), \
            int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise InvalidOptionError(f"RANK / WORLD_SIZE / LOCAL_RANK are not integers ({e}); start with torchrun") from e


def _device(local_rank: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise InvalidOptionError(f"rank {local_rank} needs cuda:{local_rank}, but this host has {count} GPU(s); "
                                 f"start torchrun with --nproc_per_node {count} or fewer")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _event_writer(path: Path | None, world_size: int) -> Any:
    if path is None:
        def to_stdout(kind: str, content: dict[str, Any]) -> None:
            print(json.dumps({"kind": kind, "world_size": world_size, "content": content}), flush=True)
        return to_stdout
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = path.open("a", encoding="utf-8")

    def to_file(kind: str, content: dict[str, Any]) -> None:
        stream.write(json.dumps({"kind": kind, "world_size": world_size, "content": content}) + "\n")
        stream.flush()
    return to_file


def run(path: Path) -> dict[str, Any]:
    """The rank torchrun started: joins the group from torchrun's environment, trains, leaves the group."""
    rank, world, local_rank = _rank_env()
    spec = DistRun.read(path)
    device = _device(local_rank)
    cancel = threading.Event()
    # torchrun sends SIGTERM to the ranks left when one dies (or when the run is stopped): finish the step in
    # hand and let rank 0 write a checkpoint, instead of dying mid-write.
    signal.signal(signal.SIGTERM, lambda *_: cancel.set())
    if spec.parallel(world):
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(minutes=10))
    emit = _event_writer(spec.events, world) if rank == 0 else (lambda kind, content: None)
    # The group is not destroyed: the rank process ends right after (exit_rank), which takes it down whole.
    return run_rank(spec, rank, world, device, emit, cancel)


def run_rank(spec: DistRun, rank: int, world: int, device: torch.device, emit: Any,
             cancel: threading.Event) -> dict[str, Any]:
    """One rank's share of the run in an already joined process group (torchrun's or Ray Train's)."""
    from qwenbook_bridge.engine.train.fsdp import ShardedParallel

    parallel = None
    if spec.parallel(world):
        parallel = (ShardedParallel if spec.strategy == "fsdp" else DataParallel)(rank, world, device)
    config = replace(spec.config, grad_accum=spec.config.grad_accum * world)
    loaded = load_model(spec.model, LoadOptions(dtype=spec.dtype, device=str(device)))
    try:
        result = train(loaded.model, loaded.tokenizer, spec.datasets, config, on_event=emit, cancel=cancel,
                       parallel=parallel)
    except Exception as e:
        if parallel is None or not parallel.is_peer_failure(e):
            raise
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise RankLostError(f"{_lost_peer_message(config, world)} (the collective said: {cause})") from e
    return result.to_dict()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: torchrun --nproc_per_node N -m qwenbook_bridge.distributed.rank run.json", file=sys.stderr)
        return 2
    rank = os.environ.get("RANK", "0")
    try:
        result = run(Path(args[0]))
    except EngineError as e:
        print(f"qwenbook dist_train rank {rank}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a rank's last word, before torchrun reports the exit code
        print(f"qwenbook dist_train rank {rank}: training stopped: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if rank == "0":  # a cancelled run's result too: it names the checkpoint to resume from
        print(json.dumps({"kind": "result", "content": result}), flush=True)
    if result["status"] != "completed":
        print(f"qwenbook dist_train rank {rank}: run stopped at step {result['step']} of {result['total_steps']} "
              f"(checkpoint {result['checkpoints'][-1] if result['checkpoints'] else 'none'})", file=sys.stderr)
        return 1
    return 0


def exit_rank(code: int) -> None:
    """End a rank process at once, its output flushed. Everything it wrote is complete by now; a normal exit
    would also tear down the process group's C++ threads and FSDP's state in whatever order the interpreter
    picks, which on a loaded machine sometimes aborts (std::terminate) after the run succeeded."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_rank(main())
