"""Spreading one model over several devices through accelerate's device maps.

`devices` on a load is "auto" (every visible GPU), a list such as ["cuda:0", "cuda:1"], or {"maxMemory":
{"cuda:0": "20GiB", "cpu": "64GiB"}}. transformers places whole decoder layers with `device_map="auto"` inside
the `max_memory` budget; accelerate's hooks move activations between cards, so generation, adapters and
serving run unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from qwenbook_bridge.engine.errors import DeviceUnavailableError, InvalidOptionError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_HOW = 'use "auto", a list like ["cuda:0", "cuda:1"], or {"maxMemory": {"cuda:0": "20GiB", "cpu": "64GiB"}}'


@dataclass(frozen=True)
class Placement:
    """Where a model's weights go: `device_map` and `max_memory` for from_pretrained, or None for one device."""

    primary: torch.device  # where input ids go: the device of the embeddings
    device_map: str | None = None
    max_memory: dict[int | str, int] | None = field(default=None, compare=False)
    key: str = ""  # part of the resident-model key and handle: "auto", "cuda:0+cuda:1", ...

    @property
    def spread(self) -> bool:
        return self.device_map is not None


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _sees(count: int) -> str:
    return f"{count} (CPU only)" if count == 0 else f"{count} (cuda:0..cuda:{count - 1})"


def parse_size(value: Any, what: str) -> int:
    """Bytes from an int or a string like "20GiB" / "500MB"."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidOptionError(f"{what} must be a byte count or a size like \"20GiB\", got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        if match is None:
            raise InvalidOptionError(f"{what} {value!r} is not a size: write it like \"20GiB\", \"500MB\" or 2147483648")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if size <= 0:
        raise InvalidOptionError(f"{what} must be more than 0 bytes, got {value!r}")
    return size


def _gpu_index(name: Any, what: str) -> int | str:
    """0 for "cuda:0" (accelerate's key for a GPU), "cpu" for the CPU, with a fixable error otherwise."""
    if not isinstance(name, str):
        raise InvalidOptionError(f"{what} must be a device name like \"cuda:0\" or \"cpu\", got {name!r}")
    key = name.strip().lower()
    if key == "cpu":
        return "cpu"
    if key == "cuda":
        key = "cuda:0"
    if not key.startswith("cuda:") or not key[5:].isdigit():
        raise InvalidOptionError(f"{what} {name!r} is not a device: use \"cuda:N\" or \"cpu\"")
    return int(key[5:])


def _check_gpus(indices: list[int]) -> None:
    count = _gpu_count()
    if not indices:
        return
    if len(indices) > count:
        raise DeviceUnavailableError(
            f"asked for {len(indices)} GPU{'s' if len(indices) != 1 else ''}, this worker sees {_sees(count)}; "
            "ask for fewer devices, or start the worker on a machine with more GPUs")
    missing = [i for i in indices if i >= count]
    if missing:
        raise DeviceUnavailableError(
            f"asked for cuda:{missing[0]}, this worker sees {_sees(count)}; pick devices it has")


def _label(keys: list[int | str]) -> str:
    return "+".join(f"cuda:{k}" if isinstance(k, int) else k for k in keys)


def resolve_placement(devices: Any) -> Placement | None:
    """The placement `devices` asks for, or None when it leaves the single `device` option in charge."""
    if devices is None:
        return None
    if isinstance(devices, str):
        if devices.strip().lower() != "auto":
            raise InvalidOptionError(f"devices {devices!r} is not understood: {_HOW}")
        count = _gpu_count()
        if count == 0:  # nothing to spread over: one CPU copy, exactly as device "cpu" would load it
            return Placement(torch.device("cpu"), key="cpu")
        budget = {i: int(torch.cuda.get_device_properties(i).total_memory) for i in range(count)}
        return Placement(torch.device("cuda", 0), "auto", budget, _label(list(budget)))
    if isinstance(devices, (list, tuple)):
        if not devices:
            raise InvalidOptionError(f"devices is an empty list: {_HOW}")
        keys = [_gpu_index(d, f"devices[{i}]") for i, d in enumerate(devices)]
        if len(set(keys)) != len(keys):
            raise InvalidOptionError(f"devices {list(devices)!r} names a device twice; list each device once")
        gpus = [k for k in keys if isinstance(k, int)]
        _check_gpus(gpus)
        if not gpus:
            return Placement(torch.device("cpu"), key="cpu")
        budget: dict[int | str, int] = {
            k: int(torch.cuda.get_device_properties(k).total_memory) for k in gpus}
        if "cpu" in keys:  # the CPU as overflow after the listed cards
            import psutil
            budget["cpu"] = int(psutil.virtual_memory().available)
        return Placement(torch.device("cuda", gpus[0]), "auto", budget, _label(list(budget)))
    if isinstance(devices, dict):
        unknown = sorted(set(devices) - {"maxMemory", "max_memory"})
        if unknown or len(devices) != 1:
            raise InvalidOptionError(f"devices has unknown keys {unknown or sorted(devices)}: {_HOW}")
        limits = next(iter(devices.values()))
        if not isinstance(limits, dict) or not limits:
            raise InvalidOptionError(f"devices.maxMemory must map device names to sizes, got {limits!r}: {_HOW}")
        budget = {}
        for name, size in limits.items():
            key = _gpu_index(name, "devices.maxMemory key")
            if key in budget:
                raise InvalidOptionError(f"devices.maxMemory names {name!r} twice; list each device once")
            budget[key] = parse_size(size, f"devices.maxMemory[{name!r}]")
        gpus = [k for k in budget if isinstance(k, int)]
        _check_gpus(gpus)
        primary = torch.device("cuda", min(gpus)) if gpus else torch.device("cpu")
        ordered = sorted(gpus) + (["cpu"] if "cpu" in budget else [])
        return Placement(primary, "auto", {k: budget[k] for k in ordered}, _label(ordered))
    raise InvalidOptionError(f"devices must be a string, a list or an object, got {type(devices).__name__}: {_HOW}")


def devices_used(model: Any, fallback: torch.device) -> list[str]:
    """Every device that holds part of `model`, in placement order (cuda:0, cuda:1, ..., cpu, disk)."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return [str(fallback)]
    names: list[str] = []
    for where in device_map.values():
        name = f"cuda:{where}" if isinstance(where, int) else str(where)
        if name not in names:
            names.append(name)
    return names


def first_device(model: Any, fallback: torch.device) -> torch.device:
    """The device of the input embeddings, where token ids must be put."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return fallback
