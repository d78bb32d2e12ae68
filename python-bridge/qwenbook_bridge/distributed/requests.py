"""A `train` request with `distributed` options: checked whole before anything starts, then run on several
ranks, processes on this host under torchrun (distributed/torchrun.py) or Ray Train workers (distributed/ray_train.py).

The ranks load the model from where the resident copy came from (its folder, or the hub id), in its dtype,
and train exactly the run the request describes: the global batch is batch_size × grad_accum rows as on one
device, split evenly over the ranks, so loss curves compare with a one-device run and checkpoints resume on
one device. The resident model is not touched and keeps serving while the ranks train.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qwenbook_bridge.distributed.torchrun import EventSink, check_ranks
from qwenbook_bridge.distributed.rank import STRATEGIES
from qwenbook_bridge.engine import InvalidOptionError, LoadedModel
from qwenbook_bridge.engine.data.datasets import DatasetSpec
from qwenbook_bridge.engine.train.config import TrainConfig

Launch = Callable[[EventSink, threading.Event], dict[str, Any]]
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _ranks(options: dict[str, Any]) -> tuple[int | None, dict[str, Any] | None, int]:
    devices, cluster = options.get("devices"), options.get("cluster")
    if (devices is None) == (cluster is None):
        raise InvalidOptionError("a several-rank run needs either devices (ranks on this host) or cluster (Ray "
                                 "workers), and not both")
    if devices is not None:
        check_ranks(devices)
        return devices, None, devices
    return None, cluster, int(cluster["workers"])


def distributed_launcher(options: dict[str, Any], loaded: LoadedModel, config: TrainConfig,
                         datasets: list[dict[str, Any]], specs: list[DatasetSpec]) -> Launch:
    """`datasets` as the request gave them (paths resolved) go to the ranks; `specs` are the same, parsed."""
    strategy = options.get("strategy", "ddp")
    if strategy not in STRATEGIES:
        raise InvalidOptionError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    devices, cluster, world = _ranks(options)
    if config.grad_accum % world:
        fit = world * max(1, round(config.grad_accum / world))
        raise InvalidOptionError(
            f"gradAccum {config.grad_accum} does not split over {world} ranks: the global batch is batchSize × "
            f"gradAccum rows, as on one device, and each rank takes an equal share; use a multiple of {world}, "
            f"e.g. gradAccum({fit})")
    if loaded.model_id.endswith((":int8", ":int4")):
        raise InvalidOptionError(f"{loaded.model_id} is quantized in this worker; several-rank training loads the "
                                 "model in every rank in 16-bit: load it without quantize and train again")
    # The ranks would each find a bad row only after loading the model: read the data here first.
    from qwenbook_bridge.engine.data.chat_encoding import build_dataset

    build_dataset(specs, loaded.tokenizer, config.max_length, truncation=config.truncation, seed=config.seed)
    source = str(loaded.path) if loaded.path.is_dir() else loaded.source
    train = {**config.to_dict(), "grad_accum": config.grad_accum // world}
    run = {"model": source, "dtype": _DTYPES.get(loaded.dtype, "auto"), "strategy": strategy,
           "datasets": datasets, "train": train}

    def launch(on_event: EventSink, cancel: threading.Event) -> dict[str, Any]:
        workdir = Path(tempfile.mkdtemp(prefix="qwenbook-ranks-"))
        try:
            if devices is not None:
                from qwenbook_bridge.distributed.torchrun import launch as on_this_host

                return on_this_host(run, devices, workdir, on_event, cancel)
            from qwenbook_bridge.distributed.ray_train import launch as on_ray

            assert cluster is not None
            return on_ray(run, world, float(cluster.get("gpus_per_worker", 0)), cluster.get("address"), workdir,
                          on_event, cancel, connect_timeout_s=float(cluster.get("connect_timeout_s", 15)))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    return launch
