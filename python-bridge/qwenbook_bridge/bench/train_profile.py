"""Where a training step's time goes: torch.profiler over a few steps, the kernels grouped into categories
(matmuls, attention, norms, elementwise, optimizer, ...) and the device's idle time between them (launch gaps:
the host not keeping the device busy)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# First match wins; kernel names as CUDA libraries, Triton and PyTorch's ATen give them.
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("optimizer", re.compile(r"adam|multi_tensor|fused_adam|_foreach|norm_kernel_?.*grad|clip", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|attn", re.I)),
    ("matmul", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|sm90_|wgmma|matmul|mm_", re.I)),
    ("norm", re.compile(r"rms|layer_?norm|norm", re.I)),
    ("loss/softmax", re.compile(r"softmax|cross_entropy|nll|logsumexp", re.I)),
    ("copy/cast", re.compile(r"copy|cast|cat_|index|gather|scatter|fill|memset|memcpy", re.I)),
    ("elementwise/reduce", re.compile(r"elementwise|vectorized|reduce|triton|pointwise|unrolled", re.I)),
)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def profile_steps(step: Callable[[int], Any], first: int, count: int, device: torch.device, out: Path,
                  label: str) -> dict[str, Any]:
    """Profiles `count` steps from step index `first`; appends a kernel table and the category summary to `out`
    (and the summary as JSON to `out` with .json), and returns the summary."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        wall = time.perf_counter()
        for i in range(first, first + count):
            step(i)
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - wall
    kernels = [e for e in prof.events() if cuda and e.device_type == torch.autograd.DeviceType.CUDA]
    by_cat: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        us = float(e.device_time_total)
        by_cat[category(e.name)] = by_cat.get(category(e.name), 0.0) + us
        by_name.setdefault(e.name, []).append(us)
    busy_us = sum(by_cat.values())
    summary = {"label": label, "steps": count, "wall_ms_per_step": 1000 * wall / count,
               "kernel_ms_per_step": busy_us / 1000 / count, "launches_per_step": len(kernels) / count,
               "idle_ms_per_step": max(0.0, 1000 * wall / count - busy_us / 1000 / count),
               "categories_ms_per_step": {k: v / 1000 / count for k, v in sorted(by_cat.items(),
                                                                                   key=lambda kv: -kv[1])},
               "top_kernels": [{"name": n[:160], "category": category(n), "calls_per_step": len(v) / count,
                                "ms_per_step": sum(v) / 1000 / count}
                               for n, v in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:25]]}
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    with out.open("a", encoding="utf-8") as f:
        f.write(f"== {label}, {count} steps\n{prof.key_averages().table(sort_by=key, row_limit=40)}\n")
        f.write(format_summary(summary) + "\n\n")
    with out.with_suffix(".json").open("a", encoding="utf-8") as f:
        f.write(json.dumps(summary) + "\n")
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"{s['label']}: {s['wall_ms_per_step']:.1f} ms a step (under the profiler), kernels "
             f"{s['kernel_ms_per_step']:.1f} ms in {s['launches_per_step']:.0f} launches, device idle "
             f"{s['idle_ms_per_step']:.1f} ms"]
    lines += [f"  {k:<20}{v:>9.2f} ms" for k, v in s["categories_ms_per_step"].items()]
    lines += ["  top kernels:"] + [f"  {k['ms_per_step']:>8.2f} ms {k['calls_per_step']:>6.0f}x  {k['category']:<18} "
                                   f"{k['name'][:100]}" for k in s["top_kernels"]]
    return "\n".join(lines)
