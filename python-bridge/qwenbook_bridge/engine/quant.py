"""Weight-only quantization with nothing beyond PyTorch: int8 per output channel and int4 in groups.

`quantize_model` swaps a loaded model's linear layers for `Int8Linear` / `Int4Linear` (quant_layers.py) one at
a time, rounding to nearest (quant_math.py) or, for int4 with calibration texts, with GPTQ (quant_gptq.py).
`save_quantized` / `load_quantized` (quant_io.py) write and read such models. "nf4" hands over to
bitsandbytes when it is installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .quant_layers import Int4Linear, Int8Linear, QuantizedLinear
from .quant_math import (GROUP_SIZES, dequantize_int4, int4_codes, int4_scales, pack_int4, pick_group_size,
                         quantize_int4, quantize_int8, unpack_int4)
from .save import Progress, ProgressFn

__all__ = [
    "GROUP_SIZES", "METHODS", "Int4Linear", "Int8Linear", "QuantBackendMissing", "QuantConfig", "QuantSummary",
    "QuantizedLinear", "dequantize_int4", "int4_codes", "int4_scales", "linear_targets", "make_quantized",
    "pack_int4", "pick_group_size", "quantize_int4", "quantize_int8", "quantize_model", "quantized_layers",
    "quantized_weight_bytes", "unpack_int4",
]


METHODS = ("int8", "int4", "nf4")


class QuantBackendMissing(ImportError):
    """A quantization method needs a library that is not installed."""


@dataclass
class QuantConfig:
    # "int8" (per-channel), "int4" (group-wise), or "nf4" (needs bitsandbytes).
    method: str = "int8"
    # int4 only. Smaller groups follow the weights more closely and cost more scales: 4.5 / 4.25 / 4.125 bits
    # per weight with 16-bit scales for 32 / 64 / 128.
    group_size: int = 128
    # int4 only: texts (or a .txt / .json / .jsonl file of them) for GPTQ rounding; None rounds to nearest.
    calibration: Sequence[str] | str | None = None
    calibration_max_length: int = 512
    calibration_max_samples: int = 128
    # GPTQ's Hessian damping, as a fraction of its mean diagonal: 0.01 is the paper's value.
    damp: float = 0.01
    # The output layer is the most sensitive one and tied to the embeddings in small Qwen models: keep it.
    include_lm_head: bool = False

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization {self.method!r}: use one of {', '.join(METHODS)}")
        if self.method == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size {self.group_size} is not supported: use 32, 64 or 128")
        if self.calibration is not None and self.method != "int4":
            raise ValueError(f"calibration (GPTQ) applies to int4 only, not {self.method}")
        if not 0 < self.damp < 1:
            raise ValueError("damp must be between 0 and 1 (0.01 is usual)")
        if self.calibration_max_length < 8 or self.calibration_max_samples < 1:
            raise ValueError("calibration_max_length must be >= 8 and calibration_max_samples >= 1")


@dataclass
class QuantSummary:
    method: str
    rounding: str  # "nearest" or "gptq"
    layers: int
    skipped: list[str] = field(default_factory=list)
    quantized_bytes: int = 0
    bf16_bytes: int = 0
    group_sizes: dict[str, int] = field(default_factory=dict)
    calibration_tokens: int = 0


def linear_targets(model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Linear]:
    """Plain nn.Linear layers to quantize, by module name (the output layer only if asked)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: m for n, m in model.named_modules()
            if type(m) is nn.Linear and (include_lm_head or m is not out_emb)}


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantized_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of codes + scales of every quantized linear, bytes the same weights take in bf16)."""
    layers = quantized_layers(model).values()
    return (sum(m.quantized_bytes() for m in layers), sum(2 * m.in_features * m.out_features for m in layers))


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def make_quantized(linear: nn.Linear, config: QuantConfig, group_size: int | None = None,
                   codes_and_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedLinear:
    w, b = linear.weight.detach(), linear.bias
    dtype = w.dtype if w.is_floating_point() else torch.bfloat16
    if config.method == "int8":
        q: QuantizedLinear = Int8Linear.from_float(w, b, dtype)
    else:
        q = Int4Linear.from_float(w, b, group_size or config.group_size, dtype, codes_and_scales)
    return q.to(w.device)


def quantize_model(model: nn.Module, config: QuantConfig, *, tokenizer: Any = None,
                   progress: ProgressFn | None = None) -> QuantSummary:
    """Replace the model's linear layers with quantized ones, in place, one layer at a time."""
    config.validate()
    if config.method == "nf4":
        return _quantize_nf4(model, config)
    if quantized_layers(model):
        raise ValueError("this model is already quantized; load the unquantized weights to quantize again")
    from .merge import has_lora

    if has_lora(model):
        raise ValueError("quantize the base model before attaching a LoRA adapter (the QLoRA order), or merge "
                         "the adapter first")
    targets = linear_targets(model, config.include_lm_head)
    summary = QuantSummary(config.method, "nearest", 0)
    groups: dict[str, int] = {}
    for name, lin in targets.items():
        g = config.group_size if config.method == "int8" else pick_group_size(lin.in_features, config.group_size)
        if g is None:
            summary.skipped.append(name)
        else:
            groups[name] = g
    tracker = Progress(progress, sum(targets[n].weight.numel() * targets[n].weight.element_size() for n in groups))
    if config.calibration is not None:
        from .quant_gptq import gptq_quantize

        summary.rounding = "gptq"
        summary.calibration_tokens = gptq_quantize(model, tokenizer, config, groups, tracker)
    else:
        tracker.set_stage("quantize")
        for name in groups:
            lin = targets[name]
            nbytes = lin.weight.numel() * lin.weight.element_size()
            _set_module(model, name, make_quantized(lin, config, groups[name]))
            tracker.advance(nbytes)
    summary.layers = len(groups)
    if config.method == "int4":
        summary.group_sizes = groups
    summary.quantized_bytes, summary.bf16_bytes = quantized_weight_bytes(model)
    tracker.finish()
    return summary


def _quantize_nf4(model: nn.Module, config: QuantConfig) -> QuantSummary:
    try:
        import bitsandbytes as bnb  # type: ignore[import-not-found]
    except ImportError:
        raise QuantBackendMissing(
            "quant 'nf4' needs the bitsandbytes package, which is not installed in the worker's Python. "
            "Install it there (pip install bitsandbytes) or use quant 'int4', which needs no extra library.") from None
    targets = linear_targets(model, config.include_lm_head)
    for name, lin in targets.items():
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                compute_dtype=lin.weight.dtype, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(lin.weight.detach().cpu(), requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        _set_module(model, name, new.to(lin.weight.device))
    return QuantSummary("nf4", "nearest", len(targets))
