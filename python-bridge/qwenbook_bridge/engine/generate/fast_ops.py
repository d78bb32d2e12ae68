"""The math of one Qwen2/Qwen3 decoder pass, written over the model's own weight tensors.

`FastDecoder` runs these functions instead of transformers' forward: they take plain tensors (no cache
objects, no mask builders, no Python-side bookkeeping), so a whole decode step can be captured in one
CUDA graph and each piece can go through `torch.compile` once and serve every layer. The numerics follow
transformers' Qwen2 code (RMSNorm in fp32, RoPE tables computed in fp32 then cast, SwiGLU) so greedy
tokens match `model.generate`. Its token choice is sampling.py's `sample_tokens`, the sampler of every decode loop.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qwenbook_bridge.engine.quant.triton_ops import QuantWeight

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")


@dataclass(frozen=True)
class DecoderShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_eps: float


@dataclass
class LayerWeights:
    """Views of one decoder layer's parameters (no copies: the model's tensors themselves)."""

    input_norm: Tensor
    q_weight: Weight
    q_bias: Tensor | None
    k_weight: Weight
    k_bias: Tensor | None
    v_weight: Weight
    v_bias: Tensor | None
    o_weight: Weight
    q_norm: Tensor | None
    k_norm: Tensor | None
    post_norm: Tensor
    gate_weight: Weight
    up_weight: Weight
    down_weight: Weight

    def attn_in_args(self) -> tuple[Weight | None, ...]:
        return (self.input_norm, self.q_weight, self.q_bias, self.k_weight, self.k_bias,
                self.v_weight, self.v_bias, self.q_norm, self.k_norm)

    def attn_out_args(self) -> tuple[Weight, ...]:
        return (self.o_weight, self.post_norm, self.gate_weight, self.up_weight, self.down_weight)


@dataclass
class DecoderWeights:
    shape: DecoderShape
    embed: Tensor
    layers: list[LayerWeights]
    final_norm: Tensor
    lm_head: Weight


# A projection's weight: a tensor for a plain nn.Linear; for the engine's int8/int4 layers, their codes and scales
# where the Triton kernels run (one custom operator, so CUDA graphs and torch.compile take it), else the layer
# itself, whose forward runs its packed kernels (and applies its bias).
Weight = Tensor | QuantWeight | torch.nn.Module


def lin(x: Tensor, w: Weight, b: Tensor | None = None) -> Tensor:
    if isinstance(w, Tensor):
        return F.linear(x, w, b)
    if isinstance(w, QuantWeight):
        y = torch.ops.qwenbook.quant_matmul(x, w.codes, w.scales, w.group_size)
        return y if b is None else y + b
    return w(x)


def weight_device(w: Weight) -> torch.device:
    if isinstance(w, QuantWeight):
        return w.codes.device
    return w.device if isinstance(w, Tensor) else next(t.device for t in w.buffers())


# Set by `reading_base_weights()`: a caller that applies adapters itself (the paged engine's adapter slots) reads
# the base weights under peft's layers whatever they have switched on.
_BASE_UNDER_ADAPTERS: contextvars.ContextVar[bool] = contextvars.ContextVar("base_under_adapters", default=False)


@contextmanager
def reading_base_weights() -> Iterator[None]:
    """Within the block, `extract_weights` reads the base projection under a peft layer even while one of its
    adapters is switched on (a merged adapter is still refused: then the base weights hold it)."""
    token = _BASE_UNDER_ADAPTERS.set(True)
    try:
        yield
    finally:
        _BASE_UNDER_ADAPTERS.reset(token)


def adapter_layer_active(module: Any) -> bool:
    """Whether a peft tuner layer adds anything to its base layer's output now: an enabled, present adapter, or
    one merged into the base weights."""
    if getattr(module, "merged", False):
        return True
    if getattr(module, "disable_adapters", False):
        return False
    names = getattr(module, "adapter_layer_names", ())
    return any(a in getattr(module, n, {}) for a in module.active_adapters for n in names)


def adapters_active(model: Any) -> bool:
    """Whether any peft layer in `model` changes what it computes (see adapter_layer_active)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) and adapter_layer_active(m) for m in model.modules())


def _base_of_adapter_layer(module: Any, where: str) -> Any:
    """The projection a peft layer wraps, when reading it gives the function the caller will compute: the layer
    adds nothing now (its adapters are off: loaded but not in use), or the caller applies adapters itself."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(module, BaseTunerLayer):
        return module
    if getattr(module, "merged", False):
        raise TypeError(f"{where} has a LoRA adapter merged into its weights; the fast decoder reads base weights "
                        "directly. Unmerge it (or merge_and_unload() for good) first")
    if adapter_layer_active(module) and not _BASE_UNDER_ADAPTERS.get():
        raise TypeError(
            f"{where} is a {type(module).__name__} with an adapter switched on: the fast decoder reads weights "
            "directly and would ignore it. Merge LoRA adapters first (peft's merge_and_unload()) or use the "
            "plain generation path for adapters.")
    return module.get_base_layer()


def _plain_linear(module: Any, where: str, dtype: torch.dtype) -> tuple[Weight, Tensor | None]:
    from qwenbook_bridge.engine.quant.layers import QuantizedLinear

    module = _base_of_adapter_layer(module, where)
    if isinstance(module, QuantizedLinear) and type(module).forward is QuantizedLinear.forward:
        packed = module.decode_weight(dtype)
        return (module, None) if packed is None else (packed, module.bias)
    # Any other layer computes more than weight @ x; reading only .weight would silently decode with the wrong
    # function, so refuse it.
    if type(module) is not torch.nn.Linear:
        raise TypeError(
            f"{where} is a {type(module).__name__}, not a plain torch.nn.Linear or an int8/int4 layer: the fast "
            "decoder reads weights directly. Merge LoRA adapters first (peft's merge_and_unload()) or use the "
            "plain generation path for adapters.")
    return module.weight, module.bias


class FusedQKV:
    """Each layer's q, k and v projections stacked in one matrix (their biases in one vector), for attn_in's
    fused path: one matrix-vector product instead of three per layer at decode, for about 6% more weight memory
    in a 7B model. They are copies: `refresh()` re-reads the model's weights, and the decoders call it whenever
    the weights may have changed. Used by FastDecoder and the paged engine's decode step."""

    def __init__(self, weights: DecoderWeights) -> None:
        self.layers = weights.layers
        self.stacked: list[tuple[Tensor, Tensor | None]] = []
        for lw in self.layers:
            assert isinstance(lw.q_weight, Tensor) and isinstance(lw.k_weight, Tensor) \
                and isinstance(lw.v_weight, Tensor)
            rows = lw.q_weight.shape[0] + lw.k_weight.shape[0] + lw.v_weight.shape[0]
            bias = None if lw.q_bias is None else torch.empty(rows, dtype=lw.q_bias.dtype, device=lw.q_bias.device)
            self.stacked.append((torch.empty(rows, lw.q_weight.shape[1], dtype=lw.q_weight.dtype,
                                             device=lw.q_weight.device), bias))

    @staticmethod
    def applies(weights: DecoderWeights) -> bool:
        """Only plain matrices stack (int8/int4 layers keep their own kernels)."""
        return all(isinstance(w, Tensor) for lw in weights.layers for w in (lw.q_weight, lw.k_weight, lw.v_weight))

    def refresh(self) -> None:
        for lw, (weight, bias) in zip(self.layers, self.stacked):
            torch.cat((lw.q_weight, lw.k_weight, lw.v_weight), out=weight)  # type: ignore[arg-type]
            if bias is not None:
                assert lw.q_bias is not None and lw.k_bias is not None and lw.v_bias is not None
                torch.cat((lw.q_bias, lw.k_bias, lw.v_bias), out=bias)

    def in_args(self, i: int) -> tuple[Tensor | None, ...]:
        """Layer i's attn_in weights with q/k/v stacked (k and v None: the fused path)."""
        lw = self.layers[i]
        weight, bias = self.stacked[i]
        return (lw.input_norm, weight, bias, None, None, None, None, lw.q_norm, lw.k_norm)


def unsupported_reason(model_type: str) -> str:
    """Why a model of `model_type` is not on the fast path (the paged chat engine, its server, the fast decoder),
    said so that a log line reads on its own."""
    if model_type.endswith("_moe"):
        # Each token's MLP is a routed mixture of experts; the fast path's math is one dense SwiGLU MLP a layer.
        return (f"{model_type} is a mixture-of-experts model, which is not on the fast path yet (the paged engine "
                f"and the fast decoder implement the dense {' and '.join(SUPPORTED_MODEL_TYPES)} layers only); it "
                "runs on transformers' own forward instead: same tokens, slower")
    return (f"model type {model_type!r} is not on the fast path (the paged engine and the fast decoder implement "
            f"{' and '.join(SUPPORTED_MODEL_TYPES)} only); it runs on transformers' own forward instead")


def extract_weights(model: Any) -> DecoderWeights:
    """Collect a loaded `Qwen2ForCausalLM`/`Qwen3ForCausalLM`'s tensors, checking what the math assumes."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(unsupported_reason(str(model_type)))
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (the fast decoder implements SwiGLU)")
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) and "sliding_attention" in layer_types:
        raise ValueError("sliding-window attention layers are not supported by the fast decoder; "
                         "use the plain generation path for this model")
    inner = model.model
    dtype = inner.embed_tokens.weight.dtype
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    shape = DecoderShape(
        num_layers=len(inner.layers), hidden_size=config.hidden_size, num_heads=heads,
        num_kv_heads=config.num_key_value_heads, head_dim=head_dim,
        vocab_size=model.lm_head.out_features, rms_eps=float(config.rms_norm_eps))
    layers = []
    for i, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        where = f"model.layers.{i}"
        q_w, q_b = _plain_linear(attn.q_proj, f"{where}.self_attn.q_proj", dtype)
        k_w, k_b = _plain_linear(attn.k_proj, f"{where}.self_attn.k_proj", dtype)
        v_w, v_b = _plain_linear(attn.v_proj, f"{where}.self_attn.v_proj", dtype)
        o_w, o_b = _plain_linear(attn.o_proj, f"{where}.self_attn.o_proj", dtype)
        g_w, g_b = _plain_linear(mlp.gate_proj, f"{where}.mlp.gate_proj", dtype)
        u_w, u_b = _plain_linear(mlp.up_proj, f"{where}.mlp.up_proj", dtype)
        d_w, d_b = _plain_linear(mlp.down_proj, f"{where}.mlp.down_proj", dtype)
        if any(b is not None for b in (o_b, g_b, u_b, d_b)):
            raise ValueError(f"{where} has biases on o_proj or the MLP, which Qwen models do not have")
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        layers.append(LayerWeights(
            input_norm=layer.input_layernorm.weight, q_weight=q_w, q_bias=q_b, k_weight=k_w, k_bias=k_b,
            v_weight=v_w, v_bias=v_b, o_weight=o_w,
            q_norm=None if q_norm is None else q_norm.weight, k_norm=None if k_norm is None else k_norm.weight,
            post_norm=layer.post_attention_layernorm.weight, gate_weight=g_w, up_weight=u_w, down_weight=d_w))
    lm_w, lm_b = _plain_linear(model.lm_head, "lm_head", dtype)
    if lm_b is not None:
        raise ValueError("lm_head has a bias, which Qwen models do not have")
    weights = DecoderWeights(shape=shape, embed=inner.embed_tokens.weight, layers=layers,
                             final_norm=inner.norm.weight, lm_head=lm_w)
    devices = {weight_device(t) for t in (weights.embed, weights.lm_head, *(lw.q_weight for lw in layers))}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        raise ValueError(f"the model's weights are on {sorted(map(str, devices))}; the fast decoder needs "
                         "the whole model on one device (load it without a multi-device device_map)")
    return weights


def rope_tables(model: Any, max_positions: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos/sin for positions [0, max_positions), from the model's own rotary module (so every RoPE type
    transformers knows, YaRN included, comes out as it would in the model), in fp32 like transformers."""
    rotary = model.model.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if "dynamic" in str(rope_type):
        raise ValueError(f"RoPE type {rope_type!r} rescales with the sequence length, which a fixed table "
                         "cannot follow; use the plain generation path for this model")
    probe = torch.zeros(1, dtype=torch.float32, device=device)
    positions = torch.arange(max_positions, device=device)[None]
    cos, sin = rotary(probe, positions)
    return cos[0].float(), sin[0].float()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attn_in(x: Tensor, cos: Tensor, sin: Tensor, eps: float, num_heads: int, num_kv_heads: int, head_dim: int,
            input_norm: Tensor, q_w: Weight, q_b: Tensor | None, k_w: Weight | None, k_b: Tensor | None,
            v_w: Weight | None, v_b: Tensor | None, q_norm: Tensor | None,
            k_norm: Tensor | None) -> tuple[Tensor, Tensor]:
    """Tokens [T, hidden] at their positions' cos/sin [T, head_dim] -> queries [T, heads, head_dim] and the
    new cache entries [2, T, kv_heads, head_dim] (keys rotated, values), one tensor so one write stores both.
    With k_w None, q_w/q_b hold the q, k and v projections stacked (one matrix-vector product instead of three)."""
    h = rms_norm(x, input_norm, eps)
    if k_w is None:
        q, k, v = lin(h, q_w, q_b).split(
            (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim), dim=-1)
    else:
        assert v_w is not None
        q, k, v = lin(h, q_w, q_b), lin(h, k_w, k_b), lin(h, v_w, v_b)
    return heads_with_rope(q, k, v, cos, sin, eps, num_heads, num_kv_heads, head_dim, q_norm, k_norm)


def heads_with_rope(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, eps: float, num_heads: int,
                    num_kv_heads: int, head_dim: int, q_norm: Tensor | None,
                    k_norm: Tensor | None) -> tuple[Tensor, Tensor]:
    """Projected q/k/v [T, *] -> attn_in's (queries, new cache entries): heads, Qwen3's q/k norms, RoPE."""
    t = q.shape[0]
    q = q.reshape(t, num_heads, head_dim)
    k = k.reshape(t, num_kv_heads, head_dim)
    v = v.reshape(t, num_kv_heads, head_dim)
    if q_norm is not None and k_norm is not None:
        q = rms_norm(q, q_norm, eps)
        k = rms_norm(k, k_norm, eps)
    c = cos.to(q.dtype)[:, None]
    s = sin.to(q.dtype)[:, None]
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    return q, torch.stack((k, v))


ATTENTION_CHUNK = 64


def grouped_decode_attention(q: Tensor, keys: Tensor, values: Tensor, visible: Tensor) -> Tensor:
    """One query per row [B, heads, head_dim] over cached keys/values [B, kv_heads, L, head_dim], slots where
    `visible` [B, L] is False masked; L must be a multiple of ATTENTION_CHUNK.

    Split-K ("flash-decoding") attention in plain tensor ops, in fp32, for torch.compile: each 64-slot chunk
    gets its own max, sum and weighted values, and the chunks are merged at the end. An attention kernel
    runs one block per (row, KV head) — four blocks for a batch-1 7B model on a GPU with 132 SMs — while
    this spreads the cache read over rows x heads x chunks. Eagerly it would materialise large products,
    so only the compiled step uses it."""
    b, kv_heads, length, head_dim = keys.shape
    chunks = length // ATTENTION_CHUNK
    qg = q.reshape(b, kv_heads, -1, 1, 1, head_dim).float()
    k = keys.reshape(b, kv_heads, 1, chunks, ATTENTION_CHUNK, head_dim).float()
    v = values.reshape(b, kv_heads, 1, chunks, ATTENTION_CHUNK, head_dim).float()
    bias = torch.zeros_like(visible, dtype=torch.float32).masked_fill(~visible, -math.inf)
    scores = (qg * k).sum(-1) * head_dim ** -0.5 + bias.view(b, 1, 1, chunks, ATTENTION_CHUNK)
    chunk_max = scores.amax(-1)
    # A chunk with every slot masked has max -inf; shift it by 0 instead so its weights are exp(-inf) = 0, not NaN.
    shift = torch.where(chunk_max == -math.inf, 0.0, chunk_max)
    p = (scores - shift[..., None]).exp()
    chunk_sum = p.sum(-1)
    chunk_out = (p[..., None] * v).sum(-2)
    weight = (chunk_max - chunk_max.amax(-1, keepdim=True)).exp()
    out = (weight[..., None] * chunk_out).sum(-2) / (weight * chunk_sum).sum(-1)[..., None]
    return out.to(q.dtype).reshape(b, -1)


def sdpa_decode_attention(q: Tensor, keys: Tensor, values: Tensor, visible: Tensor) -> Tensor:
    """The same contract through the fused attention kernel, which wins once rows x KV heads fill the GPU.
    A query head's group shares one KV head: the group becomes that head's query rows, so plain attention
    over kv_heads heads does grouped-query attention without repeating keys."""
    b, kv_heads, _, head_dim = keys.shape
    out = F.scaled_dot_product_attention(q.reshape(b, kv_heads, -1, head_dim), keys, values,
                                         attn_mask=visible[:, None, None])
    return out.reshape(b, -1)


def decode_layer(x: Tensor, cos: Tensor, sin: Tensor, kv: Tensor, slot: Tensor, visible: Tensor, chunked: bool,
                 eps: float, num_heads: int, num_kv_heads: int, head_dim: int, *weights: Tensor | None) -> Tensor:
    """One whole decoder layer for one new token per row, for torch.compile: projections, RoPE, the cache
    write (in place, at flat slots `slot` of kv viewed as [2, rows * kv_heads * max_len, head_dim]), attention
    over the first visible.shape[-1] slots, output projection and MLP."""
    q, new_kv = attn_in(x, cos, sin, eps, num_heads, num_kv_heads, head_dim, *weights[:9])
    kv.view(2, -1, head_dim).index_copy_(1, slot, new_kv.reshape(2, -1, head_dim))
    span = visible.shape[-1]
    attend = grouped_decode_attention if chunked else sdpa_decode_attention
    attn = attend(q, kv[0, :, :, :span], kv[1, :, :, :span], visible)
    o_w, post_norm, gate_w, up_w, down_w = weights[9:]
    assert o_w is not None and post_norm is not None and gate_w is not None and up_w is not None \
        and down_w is not None
    return attn_out(x, attn, eps, o_w, post_norm, gate_w, up_w, down_w)


def attn_out(x: Tensor, attn: Tensor, eps: float, o_w: Weight, post_norm: Tensor, gate_w: Weight, up_w: Weight,
             down_w: Weight) -> Tensor:
    """Residual stream [T, hidden] plus attention output [T, heads * head_dim] -> the layer's output."""
    x = x + lin(attn, o_w)
    h = rms_norm(x, post_norm, eps)
    return x + lin(F.silu(lin(h, gate_w)) * lin(h, up_w), down_w)


def final_logits(x: Tensor, norm: Tensor, lm_head: Weight, eps: float) -> Tensor:
    return lin(rms_norm(x, norm, eps), lm_head).float()
