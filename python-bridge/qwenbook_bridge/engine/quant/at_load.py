"""Quantized models in the registry: the `quant` load option, and folders written by `save_quantized`.

Quantizing while loading also measures what it cost: the unquantized model's logits on the built-in held-out
text are taken before its linear layers are replaced, and compared with the quantized model's afterwards, so the
load reply can show perplexity, mean KL and top-1 agreement without keeping a second model in memory.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwenbook_bridge.engine.errors import InvalidOptionError
from qwenbook_bridge.engine.quant.quality import QualityReport, compare, model_logits, token_windows
from qwenbook_bridge.engine.quant.config import METHODS, QuantBackendMissing, QuantConfig
from qwenbook_bridge.engine.quant.quantize import quantize_model, quantized_layers, quantized_weight_bytes
from qwenbook_bridge.engine.quant.folder import QUANT_FILE, is_quantized_folder, load_quantized
from qwenbook_bridge.engine.files.save import ProgressEvent

# (message, fraction of the quantization stage or None)
QuantProgress = Callable[[str, "float | None"], None]


def require_bitsandbytes() -> None:
    """Fail before any weight is read when nf4 cannot work (quantize_model would only notice after loading)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantBackendMissing(
            "quant 'nf4' needs the bitsandbytes package, which is not installed in the worker's Python. "
            "Install it there (pip install bitsandbytes) or use quant 'int4', which needs no extra library.")


def quant_config(spec: dict[str, Any] | None, what: str = "quant") -> QuantConfig | None:
    """A validated QuantConfig from a request's {method, group_size, calibration}, or None without one."""
    if spec is None:
        return None
    method = spec.get("method")
    if method not in METHODS:
        raise InvalidOptionError(f"{what} {method!r} is not supported: use one of {', '.join(METHODS)}")
    calibration = spec.get("calibration")
    if calibration is not None:
        path = Path(calibration)
        if not path.is_absolute():
            raise InvalidOptionError(
                f"{what} calibration must be an absolute path, got {calibration!r}: the worker runs in its own "
                "folder (the notebook API resolves relative paths against the notebook's folder)")
        if not path.is_file():
            raise InvalidOptionError(f"calibration file {path} does not exist")
    config = QuantConfig(method=method, group_size=spec.get("group_size", 128), calibration=calibration)
    try:
        config.validate()
    except ValueError as e:
        raise InvalidOptionError(f"{what}: {e}") from None
    if method == "nf4":
        require_bitsandbytes()
    return config


def quant_key(config: QuantConfig | None) -> str:
    """What distinguishes two quantized loads of the same folder (part of the registry key)."""
    if config is None:
        return ""
    key = config.method
    if config.method == "int4":
        key += f"/g{config.group_size}"
    if config.calibration is not None:
        key += f"/gptq:{config.calibration}"
    return key


def folder_method(path: Path) -> str | None:
    """The method of a folder saved quantized, or None for an ordinary model folder."""
    if not is_quantized_folder(path):
        return None
    try:
        return str(json.loads((path / QUANT_FILE).read_text(encoding="utf-8"))["method"])
    except (OSError, ValueError, KeyError) as e:
        raise InvalidOptionError(f"{path / QUANT_FILE} is unreadable ({e}); save the quantized model again") from None


def check_folder_quant(path: Path, config: QuantConfig | None) -> str | None:
    """Refuse a quant option that contradicts how a saved quantized folder is stored; return its method."""
    stored = folder_method(path)
    if stored is not None and config is not None and (config.method != stored or config.calibration is not None):
        raise InvalidOptionError(
            f"{path} holds {stored} weights already: load it without quant (or with quant '{stored}'), or load "
            f"the unquantized model to quantize it as {config.method}"
            + (" with calibration" if config.calibration is not None else ""))
    return stored


def parameter_count(model: nn.Module) -> int:
    """Parameters of the model as if unquantized (a quantized linear keeps its codes in buffers)."""
    plain = sum(p.numel() for p in model.parameters())
    return int(plain + sum(m.in_features * m.out_features for m in quantized_layers(model).values()))


def quality_dict(report: QualityReport) -> dict[str, Any]:
    return {k: v for k, v in vars(report).items() if v is not None}


@torch.no_grad()
def quantize_loaded(model: nn.Module, tokenizer: Any, config: QuantConfig, progress: QuantProgress) -> dict[str, Any]:
    """Quantize a freshly loaded model in place and return its ModelInfo `quant` entry, quality included."""
    windows = token_windows(tokenizer, None)
    progress("measuring the unquantized model on the held-out text", 0.0)
    reference_logits = {id(w): model_logits(model)(w) for w in windows}

    def on_progress(e: ProgressEvent) -> None:
        if e.stage != "done":
            what = "GPTQ calibration" if e.stage == "calibrate" else f"{config.method} rounding"
            progress(f"quantizing linear layers to {config.method} ({what})", e.fraction)

    summary = quantize_model(model, config, tokenizer=tokenizer, progress=on_progress)
    progress("measuring the quantized model on the held-out text", 1.0)
    quality = compare(model_logits(model), windows, lambda ids: reference_logits[id(ids)])
    info: dict[str, Any] = {"method": summary.method, "rounding": summary.rounding, "layers": summary.layers,
                            "quantized_bytes": summary.quantized_bytes, "bf16_bytes": summary.bf16_bytes,
                            "from_folder": False, "quality": quality_dict(quality)}
    if config.method == "int4":
        info["group_size"] = config.group_size
    return info


def load_quantized_folder(path: Path, device: torch.device, dtype: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    """A folder written by `save_quantized` -> (model, tokenizer, ModelInfo `quant` entry)."""
    manifest = json.loads((path / QUANT_FILE).read_text(encoding="utf-8"))
    model, tokenizer = load_quantized(path, device=device, dtype=dtype)
    quantized, bf16 = quantized_weight_bytes(model)
    info: dict[str, Any] = {"method": manifest["method"], "rounding": manifest.get("rounding") or "nearest",
                            "layers": len(quantized_layers(model)), "quantized_bytes": quantized, "bf16_bytes": bf16,
                            "from_folder": True}
    if manifest.get("group_size") is not None:
        info["group_size"] = int(manifest["group_size"])
    return model, tokenizer, info
