"""The arithmetic of symmetric weight-only quantization (no state, no modules).

int8: one scale per output row, scale = max|w| / 127, code = round(w / scale) in -127..127.
int4: one scale per group of `group_size` inputs, d = m / -8 with m the group's value of largest magnitude
(llama.cpp's Q4_0 rule: that value is exact and all 16 codes are used), code = clamp(round(w / d), -8, 7) + 8,
stored two to a byte (low nibble = even input index).
"""

from __future__ import annotations

import torch

GROUP_SIZES = (32, 64, 128)


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (int8 codes [N, K], scales [N]) with w ~= codes * scales[:, None]."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).to(scale_dtype).float()
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    q = torch.round(w * inv[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(scale_dtype)


def int4_scales(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Q4_0 rule: d = (value of largest magnitude) / -8 for each group -> [N, K // group_size] float32."""
    wg = w.float().reshape(w.shape[0], -1, group_size)
    idx = wg.abs().argmax(dim=-1, keepdim=True)
    return (wg.gather(-1, idx).squeeze(-1) / -8)


def int4_codes(w: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes 0..15 (value = (code - 8) * scale) as uint8 [N, K], for given per-group scales."""
    n = w.shape[0]
    d = scales.float()
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.round(w.float().reshape(n, -1, group_size) * inv[..., None]).clamp(-8, 7) + 8
    return q.reshape(n, -1).to(torch.uint8)


def quantize_int4(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (packed codes uint8 [N, K/2], scales [N, K/group_size] in scale_dtype)."""
    scales = int4_scales(w, group_size).to(scale_dtype)
    return pack_int4(int4_codes(w, scales, group_size)), scales


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    codes = unpack_int4(packed).to(dtype) - 8
    n, k = codes.shape
    return (codes.reshape(n, scales.shape[1], -1) * scales.to(dtype)[..., None]).reshape(n, k)


def pick_group_size(in_features: int, wanted: int) -> int | None:
    """The wanted group size, or the largest smaller standard one that divides the layer's input size."""
    for g in sorted((g for g in GROUP_SIZES if g <= wanted), reverse=True):
        if in_features % g == 0:
            return g
    return None
