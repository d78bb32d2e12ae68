"""One rank of the several-GPU training benchmark (bench/dist.py starts it under torchrun):

    torchrun --nproc_per_node N -m qwenbook_bridge.bench.dist_rank spec.json

Every rank builds the same random model (same seed), trains it with the engine's own step (Trainable,
StepRunner, DataParallel or ShardedParallel) on the same synthetic rows, and takes its slice of each step's
micro-batches, exactly as a `train()` run on N ranks does. The global batch is fixed by the spec, so runs on
1, 2 and 4 ranks see the same rows per step and their losses must agree to rounding. Rank 0 prints one JSON
line: losses, step times, tokens/s over every rank, and every rank's peak memory.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from statistics import median
from typing import Any

import torch
import torch.distributed as dist

from qwenbook_bridge.bench.model import build_random_model
from qwenbook_bridge.bench.train_data import synthetic_rows
from qwenbook_bridge.engine.train.data_parallel import DataParallel
from qwenbook_bridge.engine.train.fsdp import ShardedParallel
from qwenbook_bridge.engine.train.batches import collate
from qwenbook_bridge.engine.train.step import StepRunner, build_optimizer
from qwenbook_bridge.engine.train.trainable import Trainable, precision_plan
from qwenbook_bridge.engine.train.config import LoraSettings, TrainConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def run(spec: dict[str, Any]) -> dict[str, Any] | None:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timedelta(minutes=5))
    strategy, method = spec["strategy"], spec["method"]
    micro_rows, length = spec["micro_rows"], spec["length"]
    global_micro = spec["global_micro_batches"]  # micro-batches per optimizer step, over all ranks
    steps = spec["warmup"] + spec["steps"]

    torch.manual_seed(spec["seed"])  # the same random weights on every rank and in every run
    build_start = time.perf_counter()
    model = build_random_model(spec["shape"], device, torch.bfloat16 if cuda else torch.float32)
    build_s = time.perf_counter() - build_start
    cfg = TrainConfig(output_dir="-", method=method, lora=LoraSettings(r=spec["r"], alpha=2.0 * spec["r"]),
                      max_length=length, batch_size=micro_rows, grad_accum=global_micro, lr=spec["lr"],
                      schedule="constant", gradient_checkpointing=True, packing=True, seed=spec["seed"])
    cfg.validate()
    autocast, _, _ = precision_plan(cfg, model, device)
    rows = synthetic_rows(model.config.vocab_size, micro_rows * global_micro * steps, length, spec["seed"])
    units = [[i] for i in range(len(rows))]

    sharded = strategy == "fsdp"
    parallel = ShardedParallel(rank, world, device) if sharded else DataParallel(rank, world, device)
    trainable = Trainable(model, cfg, tokenizer=None, keep_original=False)
    torch.manual_seed(spec["seed"])  # the same LoRA initialization everywhere
    trainable.prepare()
    loss_module = parallel.wrap(model)
    if cuda:
        torch.cuda.empty_cache()
    optimizer = build_optimizer(trainable.parameters(), cfg, device)
    runner = StepRunner(trainable, optimizer, device=device, max_grad_norm=cfg.max_grad_norm, autocast=autocast,
                        parallel=parallel, loss_module=loss_module)
    trainable_params, total_params = trainable.count()

    losses, times, tokens = [], [], []
    for step in range(steps):
        if step == spec["warmup"] and cuda:
            torch.cuda.reset_peak_memory_stats(device)
        micro = [list(range((step * global_micro + m) * micro_rows, (step * global_micro + m + 1) * micro_rows))
                 for m in range(global_micro)]
        mine, fillers = parallel.shard(micro)
        batches = [collate(rows, units, ids, 0, True) for ids in mine]
        _sync(device)
        t0 = time.perf_counter()
        stats = runner(batches, fillers)
        loss = float(stats.loss)  # waits for the step, as the training loop does
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        tokens.append(stats.tokens)

    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    peaks: list[Any] = [None] * world
    dist.all_gather_object(peaks, {"device": str(device), "peak_bytes": peak,
                                   "name": torch.cuda.get_device_name(device) if cuda else "cpu"})
    if rank != 0:
        return None
    measured = slice(spec["warmup"], steps)
    seconds = sum(times[measured])
    return {"strategy": strategy, "method": method, "ranks": world, "shape": spec["shape"],
            "micro_rows": micro_rows, "length": length, "global_micro_batches": global_micro,
            "global_rows_per_step": micro_rows * global_micro, "trainable_params": trainable_params,
            "total_params": total_params, "build_s": build_s, "losses": losses, "step_s": times,
            "tokens_per_s": sum(tokens[measured]) / seconds if seconds > 0 else 0.0,
            # One slow step (a collective waiting on a busy host) moves the mean; the median step does not.
            "tokens_per_s_median_step": median(tokens[measured]) / median(times[measured]),
            "per_rank": peaks}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: torchrun --nproc_per_node N -m qwenbook_bridge.bench.dist_rank spec.json", file=sys.stderr)
        return 2
    result = run(json.loads(Path(args[0]).read_text(encoding="utf-8")))
    if result is not None:
        print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    from qwenbook_bridge.distributed.rank import exit_rank

    exit_rank(main())
