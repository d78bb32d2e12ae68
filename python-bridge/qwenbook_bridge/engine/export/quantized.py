"""Saving int8/int4 models as a folder that engine/quant/folder.py loads back into the same quantized layers (the
folder's layout is described there): quantized while writing, or written as they are when already quantized."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from qwenbook_bridge.engine.export.merge import (SMALL_FILES_ALLOWANCE, dominant_dtype, merge_lora, model_tensor_sources,
                                                 write_model_files)
from qwenbook_bridge.engine.model_parts import base_model_of, has_lora
from qwenbook_bridge.engine.quant.folder import FORMAT_VERSION, LAYOUT, QUANT_FILE, WEIGHTS_PREFIX, load_quantized
from qwenbook_bridge.engine.quant.quality import ExportReport, evaluate_quality, size_report
from qwenbook_bridge.engine.quant.layers import Int4Linear, Int8Linear
from qwenbook_bridge.engine.quant.config import QuantConfig
from qwenbook_bridge.engine.quant.codes import pick_group_size, quantize_int4, quantize_int8
from qwenbook_bridge.engine.quant.quantize import quantize_model, quantized_layers
from qwenbook_bridge.engine.files.save import (AtomicTarget, Progress, ProgressFn, SaveConfig, TensorSource, check_free_space,
    parse_dtype, parse_size, scaled, write_sharded_safetensors)


def _linear_names(model: nn.Module, include_lm_head: bool) -> dict[str, tuple[int, int]]:
    """Names (as in the plain model) of the linear layers to quantize -> (out_features, in_features)."""
    from peft.tuners.lora import LoraLayer

    root = base_model_of(model)
    out_emb = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    names: dict[str, tuple[int, int]] = {}
    lora_prefixes: list[str] = []
    for name, m in root.named_modules():
        if any(name.startswith(p) for p in lora_prefixes):
            continue  # the base layer and the adapter's own A/B inside a LoRA layer
        if isinstance(m, LoraLayer):
            lora_prefixes.append(name + ".")
        base = m.get_base_layer() if isinstance(m, LoraLayer) else m
        if not isinstance(base, nn.Linear):
            continue
        if not include_lm_head and (m is out_emb or base is out_emb):
            continue
        names[name] = (base.out_features, base.in_features)
    return names


def _quantized_sources(float_sources: Sequence[TensorSource], linears: dict[str, tuple[int, int]],
                       quant: QuantConfig) -> tuple[list[TensorSource], dict[str, dict[str, Any]]]:
    """Replace each linear's `weight` source by lazily computed `qweight` and `scales` sources (nearest rounding)."""
    out: list[TensorSource] = []
    modules: dict[str, dict[str, Any]] = {}
    for s in float_sources:
        name = s.name.removesuffix(".weight")
        if not s.name.endswith(".weight") or name not in linears:
            out.append(s)
            continue
        n, k = linears[name]
        scale_dtype = s.dtype
        if quant.method == "int8":
            g = None
            q_shape, q_dtype, s_shape = (n, k), torch.int8, (n,)
        else:
            g = pick_group_size(k, quant.group_size)
            if g is None:
                out.append(s)  # no group size divides this layer's input: it stays unquantized
                continue
            q_shape, q_dtype, s_shape = (n, k // 2), torch.uint8, (n, k // g)
        cache: dict[str, torch.Tensor] = {}

        def compute(part: str, s: TensorSource = s, g: int | None = g, cache: dict[str, torch.Tensor] = cache,
                    scale_dtype: torch.dtype = scale_dtype) -> torch.Tensor:
            if not cache:
                w = s.load()
                q, sc = quantize_int8(w, scale_dtype) if g is None else quantize_int4(w, g, scale_dtype)
                cache.update(qweight=q, scales=sc)
            return cache.pop(part)

        out.append(TensorSource(f"{name}.qweight", q_shape, q_dtype, lambda c=compute: c("qweight")))
        out.append(TensorSource(f"{name}.scales", s_shape, scale_dtype, lambda c=compute: c("scales")))
        modules[name] = {"method": quant.method, "in_features": k, "out_features": n,
                         **({"group_size": g} if g is not None else {})}
    return out, modules


def _existing_quantized_sources(model: nn.Module, dtype: torch.dtype | None
                                ) -> tuple[list[TensorSource], dict[str, dict[str, Any]]]:
    """Sources of a model whose quantized layers are saved as they are."""
    layers = quantized_layers(base_model_of(model))
    modules = {n: {"method": m.method, "in_features": m.in_features, "out_features": m.out_features,
                   **({"group_size": m.group_size} if isinstance(m, Int4Linear) else {})} for n, m in layers.items()}
    sources = []
    for s in model_tensor_sources(model, dtype=dtype):
        name = s.name.removesuffix(".weight")
        if s.name.endswith(".weight") and name in layers:
            m = layers[name]
            codes_shape = tuple(m.qweight.shape) if isinstance(m, Int8Linear) else (m.out_features, m.in_features // 2)
            codes_dtype = m.qweight.dtype if isinstance(m, Int8Linear) else torch.uint8
            load_codes: Callable[[], torch.Tensor] = (
                (lambda m=m: m.qweight) if isinstance(m, Int8Linear) else (lambda m=m: m.canonical_codes()))
            sources.append(TensorSource(f"{name}.qweight", codes_shape, codes_dtype, load_codes))
            sources.append(TensorSource(f"{name}.scales", tuple(m.scales.shape), m.scales.dtype,
                                        lambda m=m: m.scales))
        else:
            sources.append(s)
    return sources, modules


def save_quantized(model: nn.Module, tokenizer: Any, target: str | os.PathLike[str],
                   config: SaveConfig | None = None, *, quant: QuantConfig | None = None,
                   progress: ProgressFn | None = None, evaluate: bool = True,
                   heldout_texts: Sequence[str] | None = None, reference: nn.Module | None = None) -> ExportReport:
    """Save a quantized folder that `load_quantized` reads.

    - `model` already quantized (quant.py) and no adapter: its codes are saved as they are.
    - `model` unquantized (a LoRA adapter, if attached, is merged first) and `quant` given: the linears are
      quantized while writing, one at a time, and `model` is not changed. GPTQ (`quant.calibration`) needs a
      working copy of the model.
    - a quantized base with a LoRA adapter (QLoRA): merged on top of the dequantized weights and quantized again
      with the base's own method and group size.

    With `evaluate`, the saved folder is loaded back and compared with the unquantized model (`model` itself when
    it is unquantized, else `reference` if given): perplexity, mean KL, top-1 agreement on a held-out text.
    """
    config = config or SaveConfig()
    config.validate()
    dtype = parse_dtype(config.dtype)
    already = quantized_layers(base_model_of(model))
    if already:
        first = next(iter(already.values()))
        own = QuantConfig(first.method, getattr(first, "group_size", 128))
        if quant is not None and quant.method != own.method:
            raise ValueError(f"this model is already quantized ({own.method}); quantizing it again as "
                             f"{quant.method} would add a second rounding error. Load the unquantized model to "
                             "save it in another format.")
        # Its codes are saved as they are (a merged adapter is re-quantized with the base's own settings).
        quant = own
    elif quant is None:
        raise ValueError("this model is not quantized: pass quant=QuantConfig(method='int8' or 'int4')")
    quant.validate()
    if quant.method == "nf4":
        raise ValueError("nf4 (bitsandbytes) weights cannot be saved in this format; save int8 or int4 instead")

    atomic = AtomicTarget(target, overwrite=config.overwrite, is_dir=True)  # refuse early, before any work
    work = model
    calibrate = quant.calibration is not None and not already
    if calibrate:
        work = merge_lora(model) if has_lora(model) else copy.deepcopy(base_model_of(model))
        quantize_model(work, quant, tokenizer=tokenizer, progress=scaled(progress, 0.0, 0.5, last=False))
    if quantized_layers(base_model_of(work)) and not has_lora(work):
        sources, modules = _existing_quantized_sources(work, dtype)
        rounding = "gptq" if quant.calibration is not None else "as loaded"
    else:
        linears = _linear_names(work, quant.include_lm_head)
        sources, modules = _quantized_sources(model_tensor_sources(work, dtype=dtype), linears, quant)
        rounding = "nearest"
    if reference is None and not already:
        reference = model

    tracker = Progress(scaled(progress, 0.5 if calibrate else 0.0, 1.0, last=True), sum(s.nbytes for s in sources))
    atomic.needed = tracker.bytes_total + SMALL_FILES_ALLOWANCE
    check_free_space(atomic.target, atomic.needed)
    root = base_model_of(work)
    main_dtype = dominant_dtype(sources)
    manifest = {"format": "qwenbook-weight-only", "format_version": FORMAT_VERSION, "method": quant.method,
                "group_size": quant.group_size if quant.method == "int4" else None, "rounding": rounding,
                "dtype": str(main_dtype).removeprefix("torch."), "layout": LAYOUT, "modules": modules}
    with atomic as staging, torch.no_grad():
        tracker.set_stage("write")
        write_sharded_safetensors(staging, sources, parse_size(config.shard_size), tracker, prefix=WEIGHTS_PREFIX)
        tracker.set_stage("tokenizer")
        write_model_files(root, tokenizer, staging, main_dtype, extra_config={"quantization_config": {
            "quant_method": "qwenbook", "method": quant.method, "config_file": QUANT_FILE}})
        (staging / QUANT_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    report = ExportReport(str(atomic.target), f"safetensors-{quant.method}", size_report(atomic.target),
                          details={"layers": len(modules), "rounding": rounding})
    if evaluate and tokenizer is not None:
        tracker.set_stage("evaluate")
        device = next(root.parameters()).device
        loaded, _ = load_quantized(atomic.target, device=device, with_tokenizer=False)
        report.quality = evaluate_quality(loaded, tokenizer, reference=reference, texts=heldout_texts)
        del loaded
    tracker.finish()
    return report
