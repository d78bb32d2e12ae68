"""Weight-only quantization with nothing beyond PyTorch: int8 per output channel and int4 in groups.

`quantize_model` swaps a loaded model's linear layers for `Int8Linear` / `Int4Linear` (layers.py) one at
a time, rounding to nearest (codes.py) or, for int4 with calibration texts, with GPTQ (gptq.py).
engine/export/quantized.py writes such models and folder.py reads them back. "nf4" hands over to
bitsandbytes when it is installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from qwenbook_bridge.engine.quant.config import QuantBackendMissing, QuantConfig
from qwenbook_bridge.engine.quant.layers import QuantizedLinear, make_quantized
from qwenbook_bridge.engine.quant.codes import (pick_group_size)
from qwenbook_bridge.engine.files.save import Progress, ProgressFn



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


def quantize_model(model: nn.Module, config: QuantConfig, *, tokenizer: Any = None,
                   progress: ProgressFn | None = None) -> QuantSummary:
    """Replace the model's linear layers with quantized ones, in place, one layer at a time."""
    config.validate()
    if config.method == "nf4":
        return _quantize_nf4(model, config)
    if quantized_layers(model):
        raise ValueError("this model is already quantized; load the unquantized weights to quantize again")
    from qwenbook_bridge.engine.model_parts import has_lora

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
        from qwenbook_bridge.engine.quant.gptq import gptq_quantize

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
