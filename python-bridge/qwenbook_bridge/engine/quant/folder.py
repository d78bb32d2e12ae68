"""Reading an int8/int4 folder (written by engine/export/quantized.py) back into the same quantized layers.

Folder layout: config.json (with a `quantization_config` naming this format), generation_config.json, the
tokenizer files, `qwenbook-quant.json` (method, per-layer group sizes, the on-disk layout), and the weights as
`quantized.safetensors` (or `quantized-0000i-of-0000n.safetensors` + `quantized.safetensors.index.json`). The
weights file is deliberately not called model.safetensors: plain `from_pretrained` would otherwise load the
folder with the quantized layers missing and silently fill them with random numbers; this way it stops with
"no file named model.safetensors".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwenbook_bridge.engine.files.save import parse_dtype, read_safetensors_folder
from qwenbook_bridge.engine.model_parts import empty_model
from qwenbook_bridge.engine.quant.layers import Int4Linear, Int8Linear, QuantizedLinear

QUANT_FILE = "qwenbook-quant.json"
WEIGHTS_PREFIX = "quantized"
FORMAT_VERSION = 1
LAYOUT = ("qweight: int8 [out, in] for int8; uint8 [out, in/2] for int4, two codes per byte, low nibble = even "
          "input index. Weight = code * scale (int8) or (code - 8) * scale (int4). scales: [out] for int8, "
          "[out, in/group_size] for int4.")


def is_quantized_folder(folder: str | os.PathLike[str]) -> bool:
    """True for a folder written by `save_quantized` (load it with `load_quantized`, not from_pretrained)."""
    return (Path(folder) / QUANT_FILE).is_file()


def load_quantized(folder: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                   dtype: str | None = None, with_tokenizer: bool = True) -> tuple[nn.Module, Any]:
    """Load a folder written by `save_quantized` into Int8Linear/Int4Linear layers -> (model, tokenizer or None)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    path = Path(folder)
    manifest_path = path / QUANT_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path} is not a quantized model folder ({QUANT_FILE} is missing); load it as an "
                                "ordinary model instead")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{manifest_path}: format version {manifest.get('format_version')} is not supported "
                         f"(this version reads {FORMAT_VERSION})")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = empty_model(config)
    stored_dtype = getattr(torch, manifest.get("dtype", "float32"))
    for name, info in manifest["modules"].items():
        lin = model.get_submodule(name)
        has_bias = lin.bias is not None
        if info["method"] == "int8":
            new: QuantizedLinear = Int8Linear(info["in_features"], info["out_features"], has_bias, device="meta",
                                              scale_dtype=stored_dtype)
        else:
            new = Int4Linear(info["in_features"], info["out_features"], has_bias, info["group_size"], device="meta",
                             scale_dtype=stored_dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    state = read_safetensors_folder(path, prefix=WEIGHTS_PREFIX)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"{path}: tensors the model does not have: {unexpected[:5]}")
    model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{path}: weights missing from the files: {left[:5]}")
    target_dtype = parse_dtype(dtype)
    if target_dtype is not None:
        model.to(target_dtype)
    model.to(device)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path) if with_tokenizer else None
    return model.eval(), tokenizer
