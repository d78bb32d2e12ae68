"""Folding LoRA adapters into their base model and saving the result as a plain transformers folder.

The merge is computed tensor by tensor while writing (W + scale * B @ A in float32, or the adapter variant's own
merge for DoRA and friends), so the caller's model is left exactly as it was, adapter still attached and
trainable, and no second copy of the model is ever held. `merge_lora` builds a separate merged model object for
those who want to chat with it; it costs one model's worth of memory. A quantized base (see quant.py) is
dequantized on the way, so a QLoRA run merges into a full-precision model as usual.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwenbook_bridge.engine.model_parts import base_model_of, empty_model, has_lora
from qwenbook_bridge.engine.quant.quality import ExportReport, size_report
from qwenbook_bridge.engine.files.save import (AtomicTarget, Progress, ProgressFn, SaveConfig, TensorSource, check_free_space,
    parse_dtype, parse_size, write_sharded_safetensors)

# Tokenizer, config and chat template together stay well under this; only used for the disk-space check.
SMALL_FILES_ALLOWANCE = 32 * 2**20


class NoAdapterError(ValueError):
    """Asked to merge, but the model carries no LoRA adapter."""


def _is_quantized(module: nn.Module) -> bool:
    from qwenbook_bridge.engine.quant.layers import QuantizedLinear

    return isinstance(module, QuantizedLinear)


def _float_weight(layer: nn.Module) -> torch.Tensor:
    if _is_quantized(layer):
        return layer.dequantize(torch.float32)  # type: ignore[operator]
    return layer.weight.detach().float()


def _merged_weight_fn(layer: Any, adapters: Sequence[str]) -> Callable[[], torch.Tensor]:
    def merged() -> torch.Tensor:
        base = layer.get_base_layer()
        w = _float_weight(base).clone()
        variants = getattr(layer, "lora_variant", {})
        for name in adapters:
            if name in layer.merged_adapters:
                continue  # already folded into the base weight by peft's merge_adapter()
            if name in variants:
                w = variants[name].merge_safe(layer, name, w)
            else:
                w = w + layer.get_delta_weight(name).to(device=w.device, dtype=torch.float32)
        return w
    return merged


def _merged_bias_fn(layer: Any, adapters: Sequence[str]) -> Callable[[], torch.Tensor]:
    def merged() -> torch.Tensor:
        b = layer.get_base_layer().bias.detach().float().clone()
        for name in adapters:
            if getattr(layer, "lora_bias", {}).get(name) and name not in layer.merged_adapters:
                b = b + layer.lora_B[name].bias.detach().float() * layer.scaling[name]
        return b
    return merged


def _param_wrappers(module: nn.Module) -> tuple[list[Any], nn.Module]:
    """peft's LoRA on plain parameters (target_parameters, e.g. a mixture-of-experts model's 3-D expert weights)
    nests one wrapper per parameter around the module: (the wrappers, outermost first; the module itself)."""
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = []
    while isinstance(module, ParamWrapper):
        wrappers.append(module)
        module = module.base_layer
    return wrappers, module


def _merged_param_fn(module: nn.Module, key: str, wrappers: Sequence[Any],
                     adapter_names: Sequence[str] | None) -> Callable[[], torch.Tensor]:
    def merged() -> torch.Tensor:
        w = getattr(module, key).detach().float().clone()
        for wrapper in wrappers:
            if wrapper.parameter_name != key:
                continue
            for name in _layer_adapters(wrapper, adapter_names):
                if name not in wrapper.merged_adapters:
                    w = w + wrapper.get_delta_weight(name).to(device=w.device, dtype=torch.float32)
        return w
    return merged


def _layer_adapters(layer: Any, wanted: Sequence[str] | None) -> list[str]:
    present = set(getattr(layer, "lora_A", {})) | set(getattr(layer, "lora_embedding_A", {}))
    names = layer.active_adapters if wanted is None else wanted
    return [n for n in names if n in present]


def model_tensor_sources(model: nn.Module, *, dtype: torch.dtype | None = None,
                         adapter_names: Sequence[str] | None = None, require_adapter: bool = False
                         ) -> list[TensorSource]:
    """The tensors of the plain transformers model that `model` stands for, under transformers' names.

    LoRA layers are merged (active adapters, or `adapter_names`), quantized linears dequantized, peft's
    `modules_to_save` copies used in place of the originals, and the output embedding left out when it is tied
    to the input embedding (transformers re-ties it on load). Floating-point tensors are cast to `dtype` if given.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    root = base_model_of(model)
    lora_layers = {n: m for n, m in root.named_modules() if isinstance(m, LoraLayer)}
    if require_adapter and not lora_layers:
        raise NoAdapterError(
            "this model has no LoRA adapter to merge: train one or attach one first (for example "
            "model.withAdapter(path)), or save the model as it is without merging")
    if any(isinstance(m, TrainableTokensWrapper) for m in root.modules()):
        raise NotImplementedError("merging adapters with trainable tokens is not supported; use peft's "
                                  "merge_and_unload() and save the result")

    # A LoRA layer whose base weight is shared with another module (tied embeddings) changes both, as
    # merge_and_unload would: remember the merged version by the base weight's storage.
    merged_by_ptr: dict[int, Callable[[], torch.Tensor]] = {}
    for name, layer in lora_layers.items():
        base = layer.get_base_layer()
        adapters = _layer_adapters(layer, adapter_names)
        if isinstance(getattr(base, "weight", None), torch.Tensor) and adapters:
            merged_by_ptr[base.weight.data_ptr()] = _merged_weight_fn(layer, adapters)

    tied_out = None
    config = getattr(root, "config", None)
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    if getattr(text_config, "tie_word_embeddings", False) and hasattr(root, "get_output_embeddings"):
        tied_out = root.get_output_embeddings()

    sources: list[TensorSource] = []
    seen_ptrs: set[int] = set()
    handled: list[str] = []

    def out_dtype(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    def add(name: str, like: torch.Tensor, fn: Callable[[], torch.Tensor], shape: tuple[int, ...] | None = None) -> None:
        dt = out_dtype(like) if shape is None else (dtype or like.dtype)
        sources.append(TensorSource(name, tuple(like.shape) if shape is None else shape, dt,
                                    lambda fn=fn, dt=dt: fn().to(dt)))

    for mod_name, module in root.named_modules():
        if any(mod_name.startswith(h + ".") for h in handled):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        wrappers, inner = _param_wrappers(module)
        if wrappers:
            handled.append(mod_name)
            for key, t in inner.named_parameters(recurse=False):
                add(prefix + key, t, _merged_param_fn(inner, key, wrappers, adapter_names))
            continue
        if isinstance(module, LoraLayer):
            handled.append(mod_name)
            base = module.get_base_layer()
            adapters = _layer_adapters(module, adapter_names)
            shape = (base.out_features, base.in_features) if _is_quantized(base) else tuple(base.weight.shape)
            ref = base.scales if _is_quantized(base) else base.weight
            add(prefix + "weight", ref, _merged_weight_fn(module, adapters), shape)
            if getattr(base, "bias", None) is not None:
                add(prefix + "bias", base.bias, _merged_bias_fn(module, adapters))
            continue
        if isinstance(module, ModulesToSaveWrapper):
            handled.append(mod_name)
            active = [a for a in module.active_adapters if a in module.modules_to_save]
            inner = module.modules_to_save[active[0]] if active else module.original_module
            for k, t in inner.state_dict().items():
                add(prefix + k, t, lambda t=t: t.detach())
            continue
        if _is_quantized(module):
            handled.append(mod_name)
            add(prefix + "weight", module.scales, lambda m=module: m.dequantize(torch.float32),
                (module.out_features, module.in_features))
            if module.bias is not None:
                add(prefix + "bias", module.bias, lambda m=module: m.bias.detach())
            continue
        own = list(module._parameters.items()) + [
            (k, b) for k, b in module._buffers.items() if k not in module._non_persistent_buffers_set]
        for key, t in own:
            if t is None:
                continue
            ptr = t.data_ptr()
            if module is tied_out and key == "weight":
                continue
            if ptr in seen_ptrs and t.numel() > 0:
                # Shared storage that transformers does not re-tie: store a real copy under this name too.
                add(prefix + key, t, lambda t=t: t.detach().clone())
                continue
            seen_ptrs.add(ptr)
            fn = merged_by_ptr.get(ptr) or (lambda t=t: t.detach())
            add(prefix + key, t, fn)
    return sources


def merge_lora(model: nn.Module, *, adapter_names: Sequence[str] | None = None, dtype: str | None = None) -> nn.Module:
    """A new plain transformers model with the adapter folded in; `model` is left untouched (adapter attached).

    Costs one extra model in memory, on the device of the original weights. Same numbers as peft's
    merge_and_unload (computed in float32), and it also works on a quantized base.
    """
    target_dtype = parse_dtype(dtype)
    sources = model_tensor_sources(model, dtype=target_dtype, adapter_names=adapter_names, require_adapter=True)
    root = base_model_of(model)
    config = _plain_config(root, target_dtype or dominant_dtype(sources))
    merged = empty_model(config)
    state = {s.name: s.load() for s in sources}
    missing, unexpected = merged.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"merged tensors the model does not know: {unexpected[:5]}")
    merged.tie_weights()
    still_meta = [n for n, p in merged.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"merge left weights without values: {still_meta[:5]}")
    if getattr(root, "generation_config", None) is not None:
        merged.generation_config = copy.deepcopy(root.generation_config)
    return merged.eval()


def dominant_dtype(sources: Sequence[TensorSource]) -> torch.dtype:
    sizes: dict[torch.dtype, int] = {}
    for s in sources:
        if s.dtype.is_floating_point:
            sizes[s.dtype] = sizes.get(s.dtype, 0) + s.nbytes
    return max(sizes, key=lambda d: sizes[d]) if sizes else torch.float32


def _plain_config(root: nn.Module, dtype: torch.dtype) -> Any:
    config = copy.deepcopy(root.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(root).__name__]
    config.dtype = dtype
    return config


def write_model_files(root: nn.Module, tokenizer: Any, folder: Path, dtype: torch.dtype,
                      extra_config: dict[str, Any] | None = None) -> None:
    """config.json, generation_config.json and the tokenizer files (with its chat template)."""
    config = _plain_config(root, dtype)
    for k, v in (extra_config or {}).items():
        setattr(config, k, v)
    config.save_pretrained(folder)
    if getattr(root, "generation_config", None) is not None:
        root.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_model(model: nn.Module, tokenizer: Any, target: str | os.PathLike[str], config: SaveConfig | None = None,
               *, progress: ProgressFn | None = None, require_adapter: bool = False,
               adapter_names: Sequence[str] | None = None) -> ExportReport:
    """Save the plain-transformers form of `model` (LoRA merged, quantization undone) as a sharded safetensors
    folder that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load."""
    config = config or SaveConfig()
    config.validate()
    target_dtype = parse_dtype(config.dtype)
    max_shard = parse_size(config.shard_size)
    sources = model_tensor_sources(model, dtype=target_dtype, adapter_names=adapter_names,
                                   require_adapter=require_adapter)
    tracker = Progress(progress, sum(s.nbytes for s in sources))
    tracker.set_stage("prepare")
    atomic = AtomicTarget(target, overwrite=config.overwrite, is_dir=True,
                          needed=tracker.bytes_total + SMALL_FILES_ALLOWANCE)
    check_free_space(atomic.target, tracker.bytes_total + SMALL_FILES_ALLOWANCE)
    root = base_model_of(model)
    with atomic as staging, torch.no_grad():
        tracker.set_stage("write")
        files = write_sharded_safetensors(staging, sources, max_shard, tracker)
        tracker.set_stage("tokenizer")
        write_model_files(root, tokenizer, staging, target_dtype or dominant_dtype(sources))
    tracker.finish()
    shards = sum(1 for f in files if f.endswith(".safetensors"))
    return ExportReport(str(atomic.target), "safetensors", size_report(atomic.target),
                        details={"shards": shards, "merged": has_lora(model), "tensors": len(sources)})


def save_merged(model: nn.Module, tokenizer: Any, target: str | os.PathLike[str], config: SaveConfig | None = None,
                *, adapter: str | os.PathLike[str] | None = None, adapter_names: Sequence[str] | None = None,
                progress: ProgressFn | None = None) -> ExportReport:
    """Merge the LoRA adapter into the base and save the result (see `save_model`).

    `model` is a PeftModel, or a plain model with `adapter` naming a saved adapter folder; the adapter is then
    attached for the merge and detached again afterwards, leaving `model` as it was.
    """
    if adapter is None:
        return save_model(model, tokenizer, target, config, progress=progress, require_adapter=True,
                          adapter_names=adapter_names)
    from peft import PeftModel

    if isinstance(model, PeftModel) or has_lora(model):
        raise ValueError("the model already has an adapter attached; pass adapter=None to merge that one, or "
                         "give the plain base model together with the adapter path")
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} is not an adapter folder (no adapter_config.json in it)")
    peft_model = PeftModel.from_pretrained(model, str(adapter), adapter_name="qwenbook_merge")
    try:
        return save_model(peft_model, tokenizer, target, config, progress=progress, require_adapter=True)
    finally:
        peft_model.unload()  # puts the original modules back into `model`
