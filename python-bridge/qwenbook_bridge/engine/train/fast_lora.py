"""A faster forward and backward for peft's LoRA linear layers while training, with the same result.

peft computes `base(x) + B(A(dropout(x))) * scale` with the adapter weights kept in fp32 (it upcasts bf16 and
fp16 adapters), so on a bf16 model every adapted projection copies its input to fp32, multiplies in fp32 and
adds an fp32 [tokens, out_features] product back onto the bf16 output: several extra passes over the largest
activations of each layer, forward and backward, and as many small kernels. Here:

- the adapter runs in the input's dtype: its fp32 weights are cast down (a few KB) instead of the activations
  being cast up; the fp32 weights stay the trained parameters and get fp32 gradients;
- the scaled B product is accumulated onto the base output inside one GEMM (`addmm`: fp32 accumulation and a
  single rounding, as peft's fp32 add followed by a cast back);
- the backward writes the base and adapter contributions to the input gradient into one buffer.

The base may also be an int8/int4 layer (QLoRA, engine/quant/layers.py): its weight is dequantized into a
temporary in forward and again in backward, never kept between the two, and the adapter product is added onto
that one GEMM as for a float base (peft's own path there runs the base and the fp32 adapter separately).

In fp32 this is peft's computation up to the order of additions. Anything the fast path does not cover (more
than one active adapter, DoRA and other variants, a trainable base weight, autocast, mixed adapter batches)
runs peft's own forward unchanged.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwenbook_bridge.engine.quant.layers import QuantizedLinear


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, x_lora: torch.Tensor | None, weight: torch.Tensor | None,
                quantized: QuantizedLinear | None, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        # x_lora: the adapter's input when dropout makes it differ from x; None means x itself. The base is either
        # a float `weight` (a parameter: saving it costs nothing) or a `quantized` layer, whose weight is rebuilt
        # here and again in backward. (A float base's weight goes in as a tensor, which torch.compile traces.)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, shape[-1])
        a = lora_a.to(x.dtype)
        b_scaled = (lora_b * scaling).to(x.dtype)
        xa = xl2 @ a.t()
        w = weight if quantized is None else quantized.training_weight(x.dtype)
        out = F.linear(x2, w, None if bias is None else bias.to(x.dtype))
        out.addmm_(xa, b_scaled.t())
        ctx.save_for_backward(xl2, xa, weight, a, b_scaled)
        ctx.quantized = quantized
        ctx.scaling, ctx.shared, ctx.shape = scaling, x_lora is None, shape
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xl2, xa, weight, a, b_scaled = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        g_xa = g @ b_scaled
        grad_x = grad_xl = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ (weight if ctx.quantized is None else ctx.quantized.training_weight(g.dtype))
            if ctx.shared:
                grad_x.addmm_(g_xa, a)
            grad_x = grad_x.view(ctx.shape)
        if not ctx.shared and ctx.needs_input_grad[1]:
            grad_xl = (g_xa @ a).view(ctx.shape)
        grad_a = (g_xa.t() @ xl2).to(ctx.a_dtype)
        grad_b = (g.t() @ xa).to(ctx.b_dtype).mul_(ctx.scaling)
        return grad_x, grad_xl, None, None, None, grad_a, grad_b, None


def _traceable(x: torch.Tensor, x_lora: torch.Tensor | None, weight: torch.Tensor | None,
               quantized: QuantizedLinear | None, bias: torch.Tensor | None, lora_a: torch.Tensor,
               lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xl2 = x2 if x_lora is None else x_lora.reshape(-1, shape[-1])
    w = weight if quantized is None else quantized.training_weight(x.dtype)
    out = F.linear(x2, w, None if bias is None else bias.to(x.dtype))
    xa = xl2 @ lora_a.to(x.dtype).t()
    out = torch.addmm(out, xa, (lora_b * scaling).to(x.dtype).t())
    return out.view(*shape[:-1], out.shape[-1])


def set_traceable(root: nn.Module, on: bool) -> None:
    """Inside a layer whose saved activations a selective checkpoint picks (checkpoint_policy.py), the adapter runs
    as plain differentiable ops: the policy (and the compiler) then see every product and keep or recompute each,
    which an autograd.Function's own saved tensors and in-place sum would not allow."""
    for module in root.modules():
        if _routed(module):
            if on:
                module._lora_traceable = True
            else:
                module.__dict__.pop("_lora_traceable", None)


def _routed(module: nn.Module) -> bool:
    """Whether `install` routed this layer through the fast path."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _fast_forward


def _fast_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    plan = _plan(self, x, args, kwargs)
    if plan is None:
        return type(self).forward(self, x, *args, **kwargs)
    name, lora_a, lora_b, dropout = plan
    base = self.base_layer
    x_lora = None if isinstance(dropout, nn.Identity) or not dropout.training else dropout(x)
    quantized = base if isinstance(base, QuantizedLinear) else None
    if getattr(self, "_lora_traceable", False):
        return _traceable(x, x_lora, None if quantized else base.weight, quantized, base.bias, lora_a.weight,
                          lora_b.weight, self.scaling[name])
    return _LoraLinear.apply(x, x_lora, None if quantized else base.weight, quantized, base.bias, lora_a.weight,
                             lora_b.weight, self.scaling[name])


def _plan(layer: Any, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """(adapter name, lora_A, lora_B, dropout) when the fast path computes exactly what peft would, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged or layer.fan_in_fan_out:
        return None
    active = [n for n in layer.active_adapters if n in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    if isinstance(base, QuantizedLinear):
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return None
    elif type(base) is not nn.Linear or base.weight.requires_grad or x.dtype != base.weight.dtype:
        return None
    if base.bias is not None and base.bias.requires_grad:
        return None
    if lora_a.bias is not None or lora_b.bias is not None or torch.is_autocast_enabled(x.device.type):
        return None
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, (nn.Identity, nn.Dropout)):
        return None
    return name, lora_a, lora_b, dropout


def install(model: nn.Module) -> int:
    """Route every peft LoRA linear layer of `model` through the fast path; returns how many. peft's `unload()`
    replaces these layers with their base layers, which removes the routing with them."""
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            # An instance attribute shadows the class's forward for this object only; nn.Module calls it as usual.
            module.forward = types.MethodType(_fast_forward, module)
            count += 1
    return count


def uninstall(model: nn.Module) -> None:
    for module in model.modules():
        if _routed(module):
            del module.forward
