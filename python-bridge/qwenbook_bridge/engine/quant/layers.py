"""Int8Linear and Int4Linear: drop-in nn.Linear replacements holding quantized weights.

They subclass nn.Linear so that peft's LoRA wraps them as it wraps any linear layer (the QLoRA recipe: frozen
quantized base, LoRA in float). `weight` is None; codes are in `qweight`, scales in `scales`. Matmuls use
the engine's Triton kernels for a few input rows on CUDA (engine/quant/triton_ops.py: decoding); on the CPU a
compiled fused kernel for a few rows and dequantize-into-a-reused-buffer + one dense matmul for many
(engine/quant/cpu_ops.py: PyTorch's packed CPU operators were up to ten times slower than fp32); on
CUDA without Triton PyTorch's `_weight_int4pack_mm` for bf16, checked once against a plain
dequantize-and-matmul, which is also the fallback (and, where Triton runs, the path for many rows: prefill). `_dyn_quant_matmul_4bit` is not used: it
quantizes the activations to int8 as well, so its results would differ from weight-only quantization.
When gradients flow through a layer (LoRA training) its weights are dequantized on the fly in forward and
again in backward, so no dequantized copy is kept between the two.

Int4 codes are saved in a canonical layout (two per byte, low nibble = even input index). To run a packed
kernel they are re-laid-out in place for it (no second copy, so the memory stays at ~1/4 of bf16); saving,
moving or training the layer recovers the canonical layout exactly by running the kernel on identity rows.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from qwenbook_bridge.engine.quant import cpu_ops, triton_ops as quant_triton
from qwenbook_bridge.engine.quant.config import QuantConfig
from qwenbook_bridge.engine.quant.codes import dequantize_int4, pack_int4, quantize_int4, quantize_int8

log = logging.getLogger(__name__)

_KERNEL_CHECKED: dict[tuple[str, str, torch.dtype], bool] = {}


def _kernel_ok(kind: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Does the kernel exist here and agree with dequantize-and-matmul (and, for the packed int4 operator, give
    the codes back exactly)? Checked once per (kind, device type, dtype) on a small layer. Kinds: "int8",
    "int4" (PyTorch's packed operators), "int8-triton", "int4-triton"."""
    key = (kind, device.type, dtype)
    if key not in _KERNEL_CHECKED:
        ok = False
        method, _, impl = kind.partition("-")
        try:
            g = torch.Generator().manual_seed(0)
            w = torch.randn(64, 256, generator=g)
            layer: QuantizedLinear = (Int8Linear.from_float(w, None, dtype) if method == "int8"
                                      else Int4Linear.from_float(w, None, 64, dtype)).to(device)
            codes = layer.qweight.clone()
            ok = True
            for rows in (1, 3) if impl else (3,):
                x = torch.randn(rows, 256, generator=g).to(device, dtype)
                if impl and not quant_triton.supports(method, x, 64):
                    continue
                ref = x.float() @ layer.dequantize(torch.float32).t()
                got = layer._triton_matmul(x) if impl else layer._raw_kernel(x)
                if got is None:
                    _KERNEL_CHECKED[key] = False  # no packed operator for this device/dtype: dequantize + matmul
                    return False
                tol = 1e-3 if dtype == torch.float32 else 3e-2
                ok = ok and bool(((got.float() - ref).abs().max() <= tol * ref.abs().max()).item())
            if ok and isinstance(layer, Int4Linear):
                ok = torch.equal(layer.canonical_codes(), codes)
            if not ok:
                log.warning("%s kernel on %s/%s disagrees with the reference; using dequantize+matmul", kind,
                            device.type, dtype)
        except Exception as e:  # noqa: BLE001 - no operator, or a Triton compile/driver failure: fall back, say why
            ok = False
            log.info("%s kernel unavailable on %s/%s (%s); using dequantize+matmul", kind, device.type, dtype, e)
        _KERNEL_CHECKED[key] = ok
    return _KERNEL_CHECKED[key]


def _dequant_kernel_ok(method: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Does the one-pass Triton dequantize run here and give torch's result bit for bit? Checked once where
    Triton is available (which an environment switch can change, so that part is asked each time)."""
    if not quant_triton.available(device):
        return False
    key = (f"{method}-dequant", device.type, dtype)
    if key not in _KERNEL_CHECKED:
        ok = False
        try:
            w = torch.randn(40, 384, generator=torch.Generator().manual_seed(0))
            if method == "int8":
                codes, scales = quantize_int8(w, torch.bfloat16)
                ref = codes.to(dtype) * scales.to(dtype)[:, None]
                got = quant_triton.dequantize("int8", codes.to(device), scales.to(device), dtype)
            else:
                codes, scales = quantize_int4(w, 32, torch.bfloat16)
                ref = dequantize_int4(codes, scales, dtype)
                got = quant_triton.dequantize("int4", codes.to(device), scales.to(device), dtype, 32)
            ok = torch.equal(got.cpu(), ref)
            if not ok:
                log.warning("Triton %s dequantize on %s/%s differs from torch's; using torch", method,
                            device.type, dtype)
        except Exception as e:  # noqa: BLE001 - a compiler or driver failure: fall back, say why
            log.info("Triton %s dequantize unavailable on %s/%s (%s)", method, device.type, dtype, e)
        _KERNEL_CHECKED[key] = ok
    return _KERNEL_CHECKED[key]


class _DequantLinearFn(torch.autograd.Function):
    """y = x @ W^T with W rebuilt from the codes in forward and again in backward, never stored between."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.training_weight(x.dtype).t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.training_weight(grad.dtype), None


class QuantizedLinear(nn.Linear):
    """Base for the quantized linears. `weight` is None; codes are in `qweight`, scales in `scales`."""

    method = ""

    def __init__(self, in_features: int, out_features: int, has_bias: bool, device: Any) -> None:
        nn.Module.__init__(self)  # skip nn.Linear's weight allocation
        self.in_features = in_features
        self.out_features = out_features
        self.register_parameter("weight", None)
        bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if has_bias else None
        self.register_parameter("bias", bias)
        self._use_kernel = True

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def training_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight rebuilt for a pass that gradients flow through (forward or backward of LoRA training): a
        temporary, freed when the pass is done with it."""
        return self.dequantize(dtype)

    def _raw_kernel(self, x: torch.Tensor) -> torch.Tensor | None:
        """The packed operator's x @ W^T, or None where it does not apply to this layer/device/dtype."""
        raise NotImplementedError

    def _kernel_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        if not _kernel_ok(self.method, x.device, x.dtype):
            return None
        try:
            return self._raw_kernel(x)
        except RuntimeError as e:  # a shape the operator rejects: remember, and stay on the fallback
            log.info("%s kernel rejected a %dx%d layer (%s); using dequantize+matmul", self.method,
                     self.out_features, self.in_features, e)
            self._use_kernel = False
            return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and x2.requires_grad:
            y = self._grad_matmul(x2)
        else:
            y = self._inference_matmul(x2.contiguous())
            if y is None:
                y = x2 @ self.dequantize(x2.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _inference_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        if quant_triton.available(x.device) and _kernel_ok(f"{self.method}-triton", x.device, x.dtype):
            if quant_triton.supports(self.method, x, self._group_size()):
                return self._triton_matmul(x)
            # Many rows: dequantize + matmul. The packed operators would re-lay-out the codes that the Triton
            # kernels read, and back again at the next decode step.
            return None
        if x.device.type == "cpu" and self._use_kernel and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            return self._cpu_matmul(x)
        return self._kernel_matmul(x) if self._use_kernel else None

    def _cpu_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self, Int4Linear):
            self._to_halves()  # both CPU paths read int4 codes in this layout
        if x.shape[0] <= cpu_ops.FUSED_MAX_ROWS:
            fused = cpu_ops.fused_kernel(self.method)
            if fused is not None:
                return fused(x, self.qweight, self.scales)
        return cpu_ops.dense_matmul(x, self.method, self.qweight, self.scales)

    def _group_size(self) -> int:
        return 0

    def decode_weight(self, dtype: torch.dtype) -> quant_triton.QuantWeight | None:
        """The codes and scales for `quant_triton.quant_matmul`, where its kernels run and pass their check
        for activations in `dtype`; else None (the layer's own forward picks a path per call)."""
        device = self.qweight.device
        if not (quant_triton.available(device) and _kernel_ok(f"{self.method}-triton", device, dtype)
                and _dequant_kernel_ok(self.method, device, dtype)):  # quant_matmul's path for many rows
            return None
        if isinstance(self, Int4Linear):
            self._to_canonical()
        return quant_triton.QuantWeight(self.qweight, self.scales, self._group_size())

    def _triton_matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _grad_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return _DequantLinearFn.apply(x2, self)

    def _held_tensors(self) -> list[torch.Tensor]:
        return [self.qweight, self.scales]

    def quantized_bytes(self) -> int:
        """Bytes of everything the layer holds for its weight (codes, scales, kernel caches), bias excluded."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self._held_tensors()}
        return sum(storages.values())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"method={self.method}"


class Int8Linear(QuantizedLinear):
    method = "int8"

    def __init__(self, in_features: int, out_features: int, has_bias: bool, device: Any = None,
                 scale_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(in_features, out_features, has_bias, device)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=scale_dtype, device=device))

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None, scale_dtype: torch.dtype) -> "Int8Linear":
        layer = cls(w.shape[1], w.shape[0], bias is not None, device="meta", scale_dtype=scale_dtype)
        layer.qweight, layer.scales = quantize_int8(w, scale_dtype)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if _dequant_kernel_ok("int8", self.qweight.device, dtype):
            return quant_triton.dequantize("int8", self.qweight, self.scales, dtype)
        return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]

    def _triton_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return quant_triton.int8_matmul(x, self.qweight, self.scales)

    def _raw_kernel(self, x: torch.Tensor) -> torch.Tensor | None:
        # On CUDA the packed int8 operator was slower than dequantize + bf16 matmul (batch-1 decode, 3584x18944,
        # H200, torch 2.11: 0.75 ms vs 0.38 ms), and on the CPU up to ten times slower than fp32 (cpu_ops.py).
        return None


class Int4Linear(QuantizedLinear):
    method = "int4"

    def __init__(self, in_features: int, out_features: int, has_bias: bool, group_size: int, device: Any = None,
                 scale_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(in_features, out_features, has_bias, device)
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
        self.group_size = group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, in_features // group_size, dtype=scale_dtype,
                                                   device=device))
        # "canonical", "halves" (the CPU paths', cpu_ops.py) or the kernel whose layout qweight is in; the scale/zero tensor is cached per dtype.
        self._layout = "canonical"
        self._scale_zeros: dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None, group_size: int, scale_dtype: torch.dtype,
                   codes_and_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> "Int4Linear":
        layer = cls(w.shape[1], w.shape[0], bias is not None, group_size, device="meta", scale_dtype=scale_dtype)
        layer.qweight, layer.scales = codes_and_scales or quantize_int4(w, group_size, scale_dtype)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    # -- layouts
    def _kernel_for(self, device: torch.device) -> str | None:
        n, k = self.out_features, self.in_features
        # Not on the CPU: `_weight_int4pack_mm_for_cpu` was 4-10x slower than fp32 (cpu_ops.py).
        if device.type == "cuda" and n % 8 == 0 and k % 32 == 0:
            return "cuda"
        return None

    def canonical_codes(self) -> torch.Tensor:
        """qweight in the canonical layout, recovered from the kernel layout if needed (exact)."""
        if self._layout == "canonical":
            return self.qweight
        if self._layout == "halves":
            return cpu_ops.from_halves(self.qweight, self.group_size)
        k = self.in_features
        ones = torch.ones(self.scales.shape, dtype=torch.float32, device=self.qweight.device)
        dtype = torch.bfloat16
        sz = self._make_scale_zeros(ones, dtype)  # scale 1, zero 0 -> the kernel returns code - 8
        cols = []
        for start in range(0, k, 1024):
            eye = torch.eye(k, dtype=dtype, device=self.qweight.device)[start:start + 1024]
            cols.append(self._run_kernel(eye, sz).float().t())
        codes = (torch.cat(cols, dim=1) + 8).round().clamp(0, 15).to(torch.uint8)
        return pack_int4(codes)

    def _to_canonical(self) -> None:
        if self._layout != "canonical":
            with torch.inference_mode(False):
                self.qweight = self.canonical_codes()
            self._layout = "canonical"
        if self._scale_zeros:
            self.scales = self.scales.contiguous()  # stop sharing storage with the kernel's scale/zero tensor
            self._scale_zeros.clear()

    def _to_halves(self) -> None:
        if self._layout != "halves":
            self._to_canonical()
            # Made outside inference mode: loading a state dict later writes into the codes in place.
            with torch.inference_mode(False):
                self.qweight = cpu_ops.to_halves(self.qweight, self.group_size)
            self._layout = "halves"

    def _held_tensors(self) -> list[torch.Tensor]:
        return [self.qweight, self.scales, *self._scale_zeros.values()]

    def _make_scale_zeros(self, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        s = scales.t().to(dtype)
        return torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()

    def _run_kernel(self, x: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm(x, self.qweight, self.group_size, sz)

    def _pack_for(self, kernel: str) -> None:
        # The CUDA kernel takes the high nibble first.
        swapped = (self.qweight >> 4) | (self.qweight << 4)
        k = self.in_features
        inner_k_tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
        self.qweight = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), inner_k_tiles)
        self._layout = kernel

    def _kernel_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        y = super()._kernel_matmul(x)
        if y is None:
            self._to_canonical()
        return y

    def _raw_kernel(self, x: torch.Tensor) -> torch.Tensor | None:
        kernel = self._kernel_for(x.device)
        if kernel is None or (kernel == "cuda" and x.dtype != torch.bfloat16):
            return None
        if self._layout != kernel:
            self._to_canonical()
            self._pack_for(kernel)
        sz = self._scale_zeros.get(x.dtype)
        if sz is None:
            sz = self._scale_zeros[x.dtype] = self._make_scale_zeros(self.scales, x.dtype)
            if x.dtype == self.scales.dtype:
                self.scales = sz[..., 0].t()  # the kernel's tensor holds the scales already: keep one copy
        return self._run_kernel(x, sz)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if _dequant_kernel_ok("int4", self.qweight.device, dtype):
            return quant_triton.dequantize("int4", self.canonical_codes(), self.scales, dtype, self.group_size)
        return dequantize_int4(self.canonical_codes(), self.scales, dtype)

    def _group_size(self) -> int:
        return self.group_size

    def _triton_matmul(self, x: torch.Tensor) -> torch.Tensor:
        self._to_canonical()
        return quant_triton.int4_matmul(x, self.qweight, self.scales, self.group_size)

    def training_weight(self, dtype: torch.dtype) -> torch.Tensor:
        self._to_canonical()  # training reads the codes every pass; recovering them each time would cost a matmul
        return self.dequantize(dtype)

    # -- keep the canonical layout in state dicts and across device moves
    def _apply(self, fn: Any, recurse: bool = True) -> "Int4Linear":
        self._to_canonical()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"] = self.canonical_codes()

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        if self._layout != "canonical":
            self.qweight = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8,
                                       device=self.scales.device)
            self._layout = "canonical"
        self._scale_zeros.clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def make_quantized(linear: nn.Linear, config: QuantConfig, group_size: int | None = None,
                   codes_and_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedLinear:
    w, b = linear.weight.detach(), linear.bias
    dtype = w.dtype if w.is_floating_point() else torch.bfloat16
    if config.method == "int8":
        q: QuantizedLinear = Int8Linear.from_float(w, b, dtype)
    else:
        q = Int4Linear.from_float(w, b, group_size or config.group_size, dtype, codes_and_scales)
    return q.to(w.device)
