"""The GGUF copy of a loaded model that the llama.cpp engine runs: written once from the weights in memory (the
base weights, without LoRA adapters) and kept in a cache folder under a key made from those weights, so the next
chat, kernel or session with the same weights loads it at once, and changed weights (a full fine-tune, a merge)
get a copy of their own.

Its tensor type: q8_0 for 16- and 32-bit weights (what llama.cpp users run: half the bytes of f16 for each
token, its rounding well below what sampling notices), q8_0 for int8 layers and q4_0 for int4 layers (with a q8_0
output layer, as llama.cpp's own q4_0 files have). `QWENBOOK_CPU_GGUF_TYPE=f32` keeps fp32 weights exact (the
engine then caches keys and values in f32 too, and a greedy reply equals PyTorch's), at four times the bytes.

Where: `$QWENBOOK_GGUF_CACHE`, else `$XDG_CACHE_HOME/qwenbook/gguf`, else `~/.cache/qwenbook/gguf`. The newest
`KEEP` files stay; older ones are removed when a new one is written (a 7B copy is several GB)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import zlib
from pathlib import Path
from typing import Any

import torch

from qwenbook_bridge.engine.export.gguf import TYPES, GgufConfig, export_gguf
from qwenbook_bridge.engine.files.save import ProgressFn
from qwenbook_bridge.engine.model_parts import base_model_of
from qwenbook_bridge.engine.quant.quantize import quantized_layers

log = logging.getLogger(__name__)
KEEP = 3
_QUANT_TYPES = {"int8": "q8_0", "int4": "q4_0"}
_lock = threading.Lock()


def cache_dir() -> Path:
    env = os.environ.get("QWENBOOK_GGUF_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qwenbook" / "gguf"


def gguf_type_for(model: Any) -> str:
    """The GGUF tensor type of the model's copy (see above)."""
    wanted = os.environ.get("QWENBOOK_CPU_GGUF_TYPE", "").strip()
    if wanted:
        if wanted not in TYPES:
            raise ValueError(f"QWENBOOK_CPU_GGUF_TYPE={wanted!r} is not a GGUF type: use one of {', '.join(TYPES)}")
        return wanted
    root = base_model_of(model)
    methods = {layer.method for layer in quantized_layers(root).values()}
    if methods:
        # Mixed layers take the finer type, so that no layer loses precision it had.
        return "q8_0" if "int8" in methods or not methods <= set(_QUANT_TYPES) else "q4_0"
    return "q8_0"


def weights_key(model: Any, gguf_type: str) -> str:
    """A key for the base weights: every tensor's name, shape, type and a CRC-32 of its bytes (adapters left out),
    with the model's config. About half a second for a 0.5B model in fp32 (summing it in float64 took 10 s)."""
    root = base_model_of(model)
    h = hashlib.sha256()
    cfg = root.config.to_dict() if hasattr(root.config, "to_dict") else {}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(gguf_type.encode())
    with torch.no_grad():
        for name, t in [*root.named_parameters(), *root.named_buffers()]:
            if "lora_" in name or t.device.type == "meta":
                continue
            data = t.detach().contiguous().reshape(-1)
            crc = zlib.crc32(data.view(torch.uint8).cpu().numpy()) if data.numel() else 0
            # peft moves a wrapped layer's weight under `base_layer`: the same weights, the same key.
            name = name.replace(".base_layer", "")
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{crc}".encode())
    return h.hexdigest()[:24]


def gguf_for(model: Any, tokenizer: Any, progress: ProgressFn | None = None) -> Path:
    """The cached GGUF of `model`'s base weights, written first if there is none (`progress` sees the writing,
    as an export's progress)."""
    gguf_type = gguf_type_for(model)
    key = weights_key(model, gguf_type)
    folder = cache_dir()
    target = folder / f"{key}-{gguf_type}.gguf"
    with _lock:
        if target.exists():
            os.utime(target)  # newest used: the last one removed
            return target
        folder.mkdir(parents=True, exist_ok=True)
        log.info("writing the llama.cpp copy of the model: %s", target)
        try:
            export_gguf(model, tokenizer, target, GgufConfig(type=gguf_type, name=key), evaluate=False,
                        adapter_names=[], progress=progress)
        except Exception:
            if not target.exists():  # another process writing the same weights may have got there first
                raise
        _prune(folder, keep=target)
    return target


def _prune(folder: Path, keep: Path) -> None:
    files = sorted(folder.glob("*.gguf"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in files if p != keep][KEEP - 1:]:
        try:
            old.unlink()
        except OSError:
            pass
