"""Exporting Qwen2, Qwen2.5, Qwen3 and Qwen3-MoE models to one GGUF file that llama.cpp, Ollama and LM Studio run.

Tensor names, metadata keys and the tokenizer encoding follow llama.cpp's own converter (architectures "qwen2",
"qwen3": Qwen2's plus the per-head q/k norms and an explicit head size, "qwen3moe": Qwen3's attention with the
router as ffn_gate_inp and the experts stacked in ffn_{gate,up,down}_exps, transformers' fused gate_up_proj split
in two). The
tokenizer is stored as GPT-2-style byte-level BPE ("gpt2") with the "qwen2" pre-tokenizer, padding ids
beyond the tokenizer marked unused, special added tokens as control tokens. 1-D tensors (norms, biases) stay
f32, as llama.cpp expects. For q4_0 the token embedding (which is also the output layer when tied) is stored
as q8_0. The K-quant mixes q4_k_m, q5_k_m and q6_k pick each tensor's type as llama.cpp's `llama-quantize` does
(`llama_tensor_get_type`: output layer Q6_K, attn_v / ffn_down Q6_K on a third of the layers for the _M mixes,
rows that do not split into 256-value super-blocks falling back to q5_0 / q5_1 / q8_0), and are written by
this package's own K-quant encoder (kquants.py), gguf-py having none. A LoRA adapter is merged and int8/int4
layers dequantized on the way.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qwenbook_bridge.engine.model_parts import base_model_of, has_lora
from qwenbook_bridge.engine.export.merge import model_tensor_sources
from qwenbook_bridge.engine.export import gguf_blocks
from qwenbook_bridge.engine.export.gguf_read import GgufFile
from qwenbook_bridge.engine.export.kquants import QK_K, quantize_k
from qwenbook_bridge.engine.export.modelfile import modelfile_path, modelfile_text
from qwenbook_bridge.engine.quant.quality import (ExportReport, QualityReport, compare, model_logits, size_report,
    swapped_weights, token_windows)
from qwenbook_bridge.engine.quant.quantize import quantized_layers
from qwenbook_bridge.engine.files.atomic_write import write_text_atomic
from qwenbook_bridge.engine.files.save import (AtomicTarget, Progress, ProgressFn, TargetExistsError, TensorSource,
    check_free_space)

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
# Tensor types a file can hold: the file types that are one tensor type, the K-quants and their fallbacks.
TENSOR_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
# The K-quant mixes: their main tensor type.
K_MIXES = {"q4_k_m": "q4_k", "q5_k_m": "q5_k", "q6_k": "q6_k"}
# llama.cpp's replacement when a row does not split into 256-value super-blocks (llama_tensor_get_type).
K_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
SUPPORTED = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3moe"}
# The pre-tokenizer split of Qwen2/2.5 (tokenizer.json); llama.cpp's "qwen2" pre-tokenizer implements this regex.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


class UnsupportedArchitectureError(ValueError):
    """The model is not one this exporter knows how to write."""


@dataclass
class GgufConfig:
    # File type: f32, f16, bf16, q8_0, q4_0 (every 2-D weight that type), or a K-quant mix q4_k_m, q5_k_m, q6_k.
    type: str = "f16"
    # Tensor type of the token embedding / output layer; None: the file type's choice (q8_0 for q4_0, Q6_K for
    # the K-quant mixes).
    output_type: str | None = None
    # Written as general.name; None uses the model's folder or hub name.
    name: str | None = None
    overwrite: bool = False
    # Also write an Ollama Modelfile beside the file (<stem>.Modelfile: FROM it, TEMPLATE, stops, sampling).
    modelfile: bool = False

    def validate(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"unknown GGUF type {self.type!r}: use one of {', '.join(TYPES)}")
        if self.output_type is not None and self.output_type not in TENSOR_TYPES:
            raise ValueError(f"unknown GGUF output type {self.output_type!r}: use one of {', '.join(TENSOR_TYPES)}")


def _gguf() -> Any:
    import gguf

    return gguf


def new_gguf_writer(arch: str) -> Any:
    """A GGUFWriter that packs long metadata arrays (Qwen's 151k tokens, their types, the merges) in one pass.
    gguf-py packs them one value at a time, with a type check per value: most of a second of every export."""
    gguf = _gguf()
    vt = gguf.GGUFValueType
    numeric = {vt.INT32: "<i4", vt.UINT32: "<u4", vt.FLOAT32: "<f4"}

    class Writer(gguf.GGUFWriter):  # type: ignore[misc, valid-type]
        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if (vtype != vt.ARRAY or self.endianess != gguf.GGUFEndian.LITTLE or not isinstance(val, (list, tuple))
                    or len(val) < 2):
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            ltype = sub_type if sub_type is not None else vt.get_type(val[0])
            if ltype == vt.STRING and all(type(v) is str for v in val):
                body = b"".join(struct.pack("<Q", len(e)) + e for e in (v.encode("utf-8") for v in val))
            elif ltype in (vt.INT32, vt.UINT32) and all(isinstance(v, int) and not isinstance(v, bool) for v in val):
                body = np.asarray(val, dtype=numeric[ltype]).tobytes()  # out of range raises, as struct would
            elif ltype == vt.FLOAT32 and all(type(v) is float for v in val):
                body = np.asarray(val, dtype=numeric[ltype]).tobytes()
            else:
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            head = struct.pack("<I", vtype) if add_vtype else b""
            return head + struct.pack("<IQ", ltype, len(val)) + body

    return Writer(None, arch)


def _qtype(name: str) -> Any:
    q = _gguf().GGMLQuantizationType
    return getattr(q, name.upper())


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0", "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K"}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    # Qwen3: RMSNorm over each head's queries and keys before RoPE.
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    # Qwen3-MoE: the router, and the experts' weights as transformers holds them, [experts, out, in].
    "mlp.gate.weight": "ffn_gate_inp.weight", "mlp.experts.down_proj": "ffn_down_exps.weight",
}
# transformers fuses each expert's gate and up projections ([experts, 2 * ff, hidden], gate first); llama.cpp
# keeps them apart.
_SPLIT_NAMES = {"mlp.experts.gate_up_proj": ("ffn_gate_exps.weight", "ffn_up_exps.weight")}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_tensor_names(hf_name: str) -> tuple[str, ...]:
    """The GGUF tensors one transformers tensor becomes: one, or two halves along dim 1 for a fused gate_up."""
    if hf_name in _GLOBAL_NAMES:
        return (_GLOBAL_NAMES[hf_name],)
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return (f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}",)
    if m and m.group(2) in _SPLIT_NAMES:
        return tuple(f"blk.{m.group(1)}.{n}" for n in _SPLIT_NAMES[m.group(2)])
    raise UnsupportedArchitectureError(f"tensor {hf_name} has no place in a Qwen GGUF file")


def gguf_tensor_name(hf_name: str) -> str:
    names = gguf_tensor_names(hf_name)
    if len(names) != 1:
        raise UnsupportedArchitectureError(f"tensor {hf_name} becomes {len(names)} GGUF tensors: {', '.join(names)}")
    return names[0]


def check_supported(root: nn.Module) -> str:
    arch = type(root).__name__
    if arch not in SUPPORTED:
        raise UnsupportedArchitectureError(
            f"GGUF export supports {', '.join(SUPPORTED)} (Qwen2, Qwen2.5, Qwen3 and Qwen3-MoE models); this model "
            f"is {arch}")
    cfg = root.config
    if getattr(cfg, "use_sliding_window", False):
        raise UnsupportedArchitectureError(f"this {arch} uses sliding-window attention, which llama.cpp's "
                                           f"{SUPPORTED[arch]} architecture does not implement")
    if SUPPORTED[arch] == "qwen3moe":
        # llama.cpp's qwen3moe makes every layer a mixture of experts and always renormalises the top-k weights.
        if getattr(cfg, "mlp_only_layers", None) or getattr(cfg, "decoder_sparse_step", 1) != 1:
            raise UnsupportedArchitectureError("this Qwen3-MoE model has dense MLP layers between its expert layers "
                                               "(mlp_only_layers / decoder_sparse_step), which llama.cpp's qwen3moe "
                                               "architecture does not implement")
        if not getattr(cfg, "norm_topk_prob", True):
            raise UnsupportedArchitectureError("this Qwen3-MoE model does not renormalise its top-k expert weights "
                                               "(norm_topk_prob false); llama.cpp's qwen3moe always does, so the "
                                               "file would compute something else")
    return SUPPORTED[arch]


def _rope(cfg: Any) -> tuple[float, dict[str, Any] | None]:
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    scaling = getattr(cfg, "rope_scaling", None) or params
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), scaling


def _add_hparams(w: Any, root: nn.Module, name: str, file_type: str) -> None:
    gguf = _gguf()
    cfg = root.config
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim:  # Qwen3 sets it apart from hidden_size / heads (128 on the 0.6B's 1024 / 16)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if getattr(cfg, "num_experts", None):
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    theta, scaling = _rope(cfg)
    w.add_rope_freq_base(theta)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(scaling["factor"])
            w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        elif kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(scaling["factor"])
        else:
            raise UnsupportedArchitectureError(f"rope scaling {kind!r} has no GGUF equivalent here")
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[file_type]))
    if file_type not in ("f32", "f16", "bf16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def _split_patterns(node: Any) -> list[str]:
    if isinstance(node, list):
        return [p for item in node for p in _split_patterns(item)]
    if not isinstance(node, dict):
        return []
    found = [node["pattern"]["Regex"]] if node.get("type") == "Split" and "Regex" in node.get("pattern", {}) else []
    return found + [p for v in node.values() if isinstance(v, (list, dict)) for p in _split_patterns(v)]


# tokenizer -> ((vocabulary rows, added tokens), tables): reading the tables back from the tokenizer's JSON takes
# seconds, and a notebook exports the same model's tokenizer in several types.
_TABLES: weakref.WeakKeyDictionary[Any, tuple[tuple[int, int], tuple[list[str], list[int], list[str]]]] = \
    weakref.WeakKeyDictionary()


def _tokenizer_tables(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(token per id, GGUF token type per id, merges) for a model with `vocab_size` rows."""
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedArchitectureError("GGUF export needs a fast (tokenizers) tokenizer with a tokenizer.json")
    key = (vocab_size, len(tokenizer))  # tokens added since would change the length
    cached = _TABLES.get(tokenizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    tj = json.loads(backend.to_str())
    model = tj["model"]
    if model.get("type") != "BPE" or QWEN2_SPLIT not in _split_patterns(tj.get("pre_tokenizer")):
        raise UnsupportedArchitectureError("the tokenizer is not Qwen2's byte-level BPE, so llama.cpp would split "
                                           "text differently from transformers")
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = dict.fromkeys(tokens, gguf.TokenType.NORMAL)
    for added in tj.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        special = added.get("special") or _looks_special(added["content"])
        types[added["id"]] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise UnsupportedArchitectureError(f"the tokenizer has ids up to {max(tokens)} but the model's vocabulary "
                                           f"has {vocab_size} rows")
    token_list, type_list = [], []
    for i in range(vocab_size):
        token_list.append(tokens.get(i, f"[PAD{i}]"))
        type_list.append(types.get(i, gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tables = (token_list, type_list, merges)
    _TABLES[tokenizer] = (key, tables)
    return tables


def _add_tokenizer(w: Any, tokenizer: Any, root: nn.Module) -> None:
    token_list, type_list, merges = _tokenizer_tables(tokenizer, root.config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(token_list)
    w.add_token_types(type_list)
    w.add_token_merges(merges)
    cfg = root.config
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(cfg, "bos_token_id", None)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(cfg, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
    for value, add in ((bos, w.add_bos_token_id), (eos, w.add_eos_token_id), (pad, w.add_pad_token_id)):
        if value is not None:
            add(int(value))
    # Qwen's tokenizer adds no BOS; llama.cpp would otherwise prepend one and change every result.
    w.add_add_bos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        w.add_chat_template(template)


@dataclass
class _Planned:
    source: TensorSource
    gguf_name: str
    qtype_name: str
    byte_shape: tuple[int, ...]


def _gguf_sources(sources: Sequence[TensorSource]) -> list[tuple[str, TensorSource]]:
    """(GGUF name, tensor) pairs: a fused expert gate_up becomes its gate half and its up half."""
    out: list[tuple[str, TensorSource]] = []
    for s in sources:
        names = gguf_tensor_names(s.name)
        if len(names) == 1:
            out.append((names[0], s))
            continue
        half = s.shape[1] // 2
        shape = (s.shape[0], half, *s.shape[2:])
        for i, name in enumerate(names):
            out.append((name, TensorSource(name, shape, s.dtype,
                                           lambda s=s, i=i: s.load()[:, i * half:(i + 1) * half].contiguous())))
    return out


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v / ffn_down get Q6_K in the _M mixes: the first and last
    eighth, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _k_mix_type(name: str, row: int, mix: str, n_layers: int, n_experts: int, tied: bool) -> tuple[str, str | None]:
    """(tensor type, why it is not the mix's main type or None) of a 2-D+ weight in a K-quant mix, following
    llama.cpp's llama_tensor_get_type for Q4_K_M / Q5_K_M / Q6_K."""
    main = K_MIXES[mix]
    m = re.match(r"^blk\.(\d+)\.", name)
    layer = int(m.group(1)) if m else -1
    t, why = main, None
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        t, why = ("q8_0", f"output layer with rows of {row}, not a multiple of {QK_K}") if row % QK_K else (
            "q6_k", "output layer")
        return t, why
    if name.endswith("attn_v.weight"):
        if mix != "q6_k" and _use_more_bits(layer, n_layers):
            t, why = "q6_k", "attn_v on a layer llama.cpp gives more bits"
        if n_experts == 8:
            t, why = "q8_0", "attn_v of an 8-expert model"
    elif name.endswith("attn_k.weight") and n_experts == 8:
        t, why = "q8_0", "attn_k of an 8-expert model"
    elif "ffn_down" in name and mix != "q6_k" and _use_more_bits(layer, n_layers):
        t, why = "q6_k", "ffn_down on a layer llama.cpp gives more bits"
    elif name.endswith("attn_output.weight") and n_experts == 8 and mix == "q4_k_m":
        t, why = "q5_k", "attn_output of an 8-expert model"
    if t in K_FALLBACK and row % QK_K:
        t, why = K_FALLBACK[t], f"rows of {row}, not a multiple of {QK_K}"
    return t, why


def _plan(sources: Sequence[TensorSource], cfg: GgufConfig, model_cfg: Any
          ) -> tuple[list[_Planned], list[str], dict[str, str]]:
    """Each tensor's type; the names kept f16 (rows that split into no whole block); for a K-quant mix, the
    tensors given another type than the mix's main one, with the reason."""
    gguf = _gguf()
    pairs = _gguf_sources(sources)
    tied = not any(name == "output.weight" for name, _ in pairs)
    n_experts = int(getattr(model_cfg, "num_experts", 0) or 0)
    default_out = "q8_0" if cfg.type == "q4_0" else cfg.type
    planned, kept_f16, other = [], [], {}
    for name, s in pairs:
        if len(s.shape) <= 1 or (name.endswith("ffn_gate_inp.weight") and cfg.type in K_MIXES):
            t = "f32"  # llama-quantize leaves the MoE router unquantized (f32, as the converter writes it)
        elif cfg.type in K_MIXES:
            t, why = _k_mix_type(name, s.shape[-1], cfg.type, model_cfg.num_hidden_layers, n_experts, tied)
            if cfg.output_type and name in ("token_embd.weight", "output.weight"):
                t, why = cfg.output_type, "output_type"
            if why:
                other[name] = f"{t}: {why}"
        else:
            t = (cfg.output_type or default_out) if name in ("token_embd.weight", "output.weight") else cfg.type
        block = gguf.GGML_QUANT_SIZES[_qtype(t)][0]
        if s.shape[-1] % block:
            kept_f16.append(name)  # a row that does not split into whole blocks: f16, as llama.cpp does
            t = "f16"
        if t not in ("f32", "f16"):
            byte_shape = tuple(gguf.quant_shape_to_byte_shape(s.shape, _qtype(t)))
        else:
            byte_shape = s.shape
        planned.append(_Planned(s, name, t, byte_shape))
    return planned, kept_f16, other


def _encode(t: torch.Tensor, qtype_name: str) -> np.ndarray:
    arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
    if qtype_name == "f32":
        return arr
    if qtype_name == "f16":
        return arr.astype(np.float16)
    if qtype_name in K_FALLBACK:
        return quantize_k(arr, qtype_name)
    return gguf_blocks.quantize(arr, _qtype(qtype_name))


def export_gguf(model: nn.Module, tokenizer: Any, target: str | os.PathLike[str], config: GgufConfig | None = None,
                *, progress: ProgressFn | None = None, evaluate: bool = True,
                heldout_texts: Sequence[str] | None = None, adapter_names: Sequence[str] | None = None
                ) -> ExportReport:
    """Write `model` (Qwen2, Qwen3 or Qwen3-MoE; LoRA merged, int8/int4 dequantized) as one GGUF file.

    `adapter_names` picks the LoRA adapters merged (None: the active ones; [] the base weights alone).
    With `evaluate`, the written tensors are read back and run in PyTorch in place of the model's own weights
    (one layer at a time) to report perplexity, mean KL and top-1 agreement against the unexported model: the
    cost of the weight rounding. llama.cpp also rounds activations in its quantized matmuls, not measured here.
    """
    config = config or GgufConfig()
    config.validate()
    root = base_model_of(model)
    arch = check_supported(root)
    atomic = AtomicTarget(target, overwrite=config.overwrite, is_dir=False)
    modelfile = modelfile_path(atomic.target) if config.modelfile else None
    if modelfile is not None and modelfile.exists() and not config.overwrite:
        raise TargetExistsError(f"{modelfile} already exists (the Ollama Modelfile written beside {atomic.target.name}"
                                "): nothing was written; pass overwrite=True to replace both, or turn the Modelfile "
                                "off")
    sources = model_tensor_sources(model, adapter_names=adapter_names)
    planned, kept_f16, other_types = _plan(sources, config, root.config)
    elem = {"f32": 4, "f16": 2}
    nbytes = [math.prod(p.byte_shape) * elem.get(p.qtype_name, 1) for p in planned]
    tracker = Progress(progress, sum(nbytes))
    tracker.set_stage("prepare")
    name = config.name or Path(str(getattr(root.config, "name_or_path", "") or "qwen2")).name or "qwen2"
    writer = new_gguf_writer(arch)
    _add_hparams(writer, root, name, config.type)
    _add_tokenizer(writer, tokenizer, root)
    np_dtypes = {"f32": np.float32, "f16": np.float16}
    for p, n in zip(planned, nbytes):
        if p.qtype_name in np_dtypes:
            writer.add_tensor_info(p.gguf_name, p.source.shape, np.dtype(np_dtypes[p.qtype_name]), n)
        else:
            writer.add_tensor_info(p.gguf_name, p.byte_shape, np.dtype(np.uint8), n, raw_dtype=_qtype(p.qtype_name))
    # Token list and merges add some megabytes of metadata on top of the tensors.
    atomic.needed = tracker.bytes_total + 64 * 2**20
    check_free_space(atomic.target, atomic.needed)
    with atomic as staging, torch.no_grad():
        try:
            writer.write_header_to_file(path=staging)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            tracker.set_stage("write")
            for p, n in zip(planned, nbytes):
                data = _encode(p.source.load(), p.qtype_name)
                writer.write_tensor_data(data)
                tracker.advance(n)
        finally:
            writer.close()
    report = ExportReport(str(atomic.target), f"gguf-{config.type}", size_report(atomic.target),
                          details={"tensors": len(planned), "kept_f16": kept_f16,
                                   "types": sorted({p.qtype_name for p in planned})})
    if config.type in K_MIXES:
        counts: dict[str, int] = {}
        for p in planned:
            counts[p.qtype_name] = counts.get(p.qtype_name, 0) + 1
        report.details["tensor_types"] = counts
        report.details["other_types"] = other_types
    if modelfile is not None:
        text, info = modelfile_text(atomic.target.name, tokenizer, getattr(root, "generation_config", None))
        write_text_atomic(modelfile, text)
        report.details["modelfile"] = {"path": modelfile.name, **info}
    if evaluate and not quantized_layers(root):
        tracker.set_stage("evaluate")
        report.quality = gguf_weight_quality(model, tokenizer, atomic.target, heldout_texts)
    tracker.finish()
    return report


def gguf_weight_quality(model: nn.Module, tokenizer: Any, gguf_path: str | os.PathLike[str],
                        texts: Sequence[str] | None = None, max_length: int = 512) -> QualityReport:
    """Run `model` with its weights replaced by the GGUF file's (dequantized) ones and compare with the model."""
    root = base_model_of(model)
    windows = token_windows(tokenizer, texts, max_length)
    label = "built-in held-out text" if texts is None else f"{len(texts)} held-out text(s)"
    with GgufFile(gguf_path) as gf:
        tied = "output.weight" not in gf.tensors

        def provider(hf_name: str) -> torch.Tensor | None:
            while ".base_layer." in hf_name:  # peft nests one wrapper per adapted expert parameter
                hf_name = hf_name.replace(".base_layer.", ".")
            if hf_name == "lm_head.weight" and tied:
                hf_name = "model.embed_tokens.weight"
            try:
                names = gguf_tensor_names(hf_name)
            except UnsupportedArchitectureError:
                return None
            if not all(n in gf.tensors for n in names):
                return None
            parts = [gf.dequantize(n) for n in names]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # a fused expert gate_up

        plain = model_logits(model)

        def candidate(ids: torch.Tensor) -> torch.Tensor:
            with swapped_weights(root, provider):
                if has_lora(model) and hasattr(model, "disable_adapter"):
                    with model.disable_adapter():  # the file has the adapter merged in already
                        return plain(ids)
                return plain(ids)

        was_training = model.training
        model.eval()
        try:
            return compare(candidate, windows, plain, label)
        finally:
            model.train(was_training)
