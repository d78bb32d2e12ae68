"""Devices and memory: which devices exist, which one a request means, and how much memory is in use."""

from __future__ import annotations

import resource
import sys

import psutil
import torch

from qwenbook_bridge.engine.errors import DeviceUnavailableError


def available_devices() -> list[str]:
    """`cpu` plus one `cuda:N` per visible GPU."""
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["cpu", *gpus]


def resolve_device(device: str, default: str = "auto") -> torch.device:
    """Turn `auto`, `cpu`, `cuda` or `cuda:N` into a concrete device, with a fixable error for a missing GPU."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        name = default if default != "auto" else ("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        name = "cuda:0"
    if not name.startswith("cuda:") or not name[5:].isdigit():
        raise DeviceUnavailableError(f"device {device!r} is not understood: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise DeviceUnavailableError(
            f"device {device!r} was requested but CUDA is not available to this worker (torch {torch.__version__} is "
            f"{build}); use device 'cpu' or 'auto', or start the worker on a machine with a GPU")
    index = int(name[5:])
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceUnavailableError(
            f"device {device!r} was requested but this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def configure_cuda() -> None:
    """Process-wide CUDA settings, applied once a model is placed on a GPU.

    PyTorch's cuDNN backend for scaled_dot_product_attention builds a new execution plan for every new key
    length, and decoding grows the key length by one each step: on H100/H200 a 1-row decode step of a small
    model took 51 ms with it and 1.9 ms without. Turning it off leaves flash / memory-efficient / math
    attention, for the notebook's generate and the HTTP server's batch alike.
    """
    if torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_snapshot() -> list[dict]:
    """Memory per device, shaped like the protocol's DeviceMemory: one entry per CUDA device, or, when no GPU
    is in use, one `cpu` entry for this process's resident memory against the machine's RAM.

    CUDA devices are listed once CUDA is initialised (a model was put there): asking earlier would create a
    CUDA context and take GPU memory from a worker that may only ever use the CPU.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({
                "device": f"cuda:{i}",
                "kind": "cuda",
                "name": props.name,
                "used": int(torch.cuda.memory_allocated(i)),
                "reserved": int(torch.cuda.memory_reserved(i)),
                "peak": int(torch.cuda.max_memory_allocated(i)),
                "total": int(props.total_memory),
            })
        return devices
    rss = int(psutil.Process().memory_info().rss)
    return [{
        "device": "cpu",
        "kind": "cpu",
        "name": "process memory (RSS)",
        "used": rss,
        # getrusage and /proc count pages a little differently; the peak is never below what is in use now.
        "peak": max(_peak_rss_bytes(), rss),
        "total": int(psutil.virtual_memory().total),
    }]
