"""Writing model files safely: size strings, disk-space checks, atomic targets and a streaming safetensors writer.

Everything that writes a model (merge, quantized save, GGUF export, training checkpoints) goes through
`AtomicTarget` (atomic_write.py): the data is written under a hidden sibling name (`.name.partial-<pid>-XXXX`)
and renamed into place only once complete, so a crash or a full disk never leaves a folder that looks finished.
Tensors are given as `TensorSource`s (shape, dtype and a function that produces the tensor) so a shard plan is made
before any weight is computed and each weight exists in memory only while it is written.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# Re-exported: the atomic-write helper is shared with the checkpoint writer, and callers import these from here.
from qwenbook_bridge.engine.files.atomic_write import AtomicTarget, TargetExistsError, check_free_space, format_bytes  # noqa: F401
from qwenbook_bridge.engine.errors import InsufficientDiskSpaceError  # noqa: F401


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report. `fraction` runs 0..1 over the whole operation and never goes backwards."""

    stage: str
    fraction: float
    bytes_done: int
    bytes_total: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressFn = Callable[[ProgressEvent], None]


def scaled(callback: ProgressFn | None, low: float, high: float, last: bool) -> ProgressFn | None:
    """Map a sub-task's 0..1 onto low..high of the whole; only the `last` sub-task may report "done"."""
    if callback is None:
        return None

    def emit(e: ProgressEvent) -> None:
        stage = e.stage if last or e.stage != "done" else "prepare"
        callback(ProgressEvent(stage, low + (high - low) * e.fraction, e.bytes_done, e.bytes_total))
    return emit


class Progress:
    """Turns byte counts into `ProgressEvent`s for an optional callback."""

    def __init__(self, callback: ProgressFn | None, bytes_total: int = 0) -> None:
        self._callback = callback
        self.bytes_total = bytes_total
        self.bytes_done = 0
        self.stage = "prepare"

    def set_stage(self, stage: str) -> None:
        self.stage = stage
        self._emit()

    def advance(self, nbytes: int) -> None:
        self.bytes_done = min(self.bytes_total, self.bytes_done + nbytes)
        self._emit()

    def finish(self) -> None:
        self.stage = "done"
        self.bytes_done = self.bytes_total
        self._emit(1.0)

    def _emit(self, fraction: float | None = None) -> None:
        if self._callback is None:
            return
        if fraction is None:
            # Bytes written dominate the time; hold back the last percent for the final rename.
            fraction = 0.99 * self.bytes_done / self.bytes_total if self.bytes_total else 0.0
        self._callback(ProgressEvent(self.stage, fraction, self.bytes_done, self.bytes_total))


_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPE_NAMES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use one of float32, bfloat16, float16 (or fp32, bf16, fp16)") from None


@dataclass
class SaveConfig:
    """How a model folder is written."""

    # transformers' own loader reads shards of any size; 2GB keeps each file easy to upload and resume.
    shard_size: str | int = "2GB"
    # Cast floating-point weights on the way out ("bfloat16" halves an fp32 model); None keeps each tensor's dtype.
    dtype: str | None = None
    # A target folder that exists and is not empty is refused unless this is set; then it is replaced whole.
    overwrite: bool = False

    def validate(self) -> None:
        parse_size(self.shard_size)
        parse_dtype(self.dtype)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: str | int) -> int:
    """Parse a shard size such as "2GB", "500MB", "1.5GiB" or a byte count. GB = 10^9 bytes, as transformers uses."""
    if isinstance(value, bool):
        raise ValueError(f"size must be a string like '2GB' or a number of bytes, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise ValueError(f"cannot read size {value!r}: write a number with a unit, like '2GB', '500MB' or '1.5GiB'")
        n = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])
    else:
        raise ValueError(f"size must be a string like '2GB' or a number of bytes, got {type(value).__name__}")
    if n < 1:
        raise ValueError(f"size {value!r} is not positive: use something like '2GB'")
    return n


@dataclass
class TensorSource:
    """A tensor to write: its name, shape and dtype up front, its data from `load()` only when written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _element_size(self.dtype)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def plan_shards(sources: Sequence[TensorSource], max_shard_bytes: int) -> list[list[TensorSource]]:
    """Fill shards in order, as transformers does; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorSource]] = [[]]
    size = 0
    for s in sources:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def write_safetensors_file(path: Path, sources: Sequence[TensorSource], metadata: dict[str, str],
                           on_bytes: Callable[[int], None]) -> None:
    """Write one .safetensors file tensor by tensor (the format: u64 header length, JSON header, raw data)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for s in sources:
        if s.dtype not in _ST_DTYPES:
            raise TypeError(f"{s.name}: dtype {s.dtype} cannot be stored in safetensors")
        header[s.name] = {"dtype": _ST_DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for s in sources:
            t = s.load().detach()
            if tuple(t.shape) != s.shape or t.dtype != s.dtype:
                raise RuntimeError(f"{s.name}: expected {s.shape} {s.dtype}, got {tuple(t.shape)} {t.dtype}")
            data = t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            on_bytes(s.nbytes)
            del t, data
        f.flush()
        os.fsync(f.fileno())


def write_sharded_safetensors(folder: Path, sources: Sequence[TensorSource], max_shard_bytes: int,
                              progress: Progress, prefix: str = "model") -> list[str]:
    """Write `prefix.safetensors`, or numbered shards plus `prefix.safetensors.index.json` when more than one
    is needed (transformers' own layout). Returns the file names written."""
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate tensor names: {dup[:5]}")
    shards = plan_shards(sources, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        fname = f"{prefix}.safetensors"
        write_safetensors_file(folder / fname, shards[0], metadata, progress.advance)
        return [fname]
    files: list[str] = []
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_file(folder / fname, shard, metadata, progress.advance)
        files.append(fname)
        weight_map.update({s.name: fname for s in shard})
    index = {"metadata": {"total_size": sum(s.nbytes for s in sources)}, "weight_map": weight_map}
    index_name = f"{prefix}.safetensors.index.json"
    (folder / index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return files + [index_name]


def read_safetensors_folder(folder: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    """Load every tensor of a (possibly sharded) safetensors folder into CPU memory."""
    from safetensors.torch import load_file

    index = folder / f"{prefix}.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (folder / f"{prefix}.safetensors").is_file():
        files = [f"{prefix}.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} has neither {prefix}.safetensors nor {index.name}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(folder / f)))
    return out
