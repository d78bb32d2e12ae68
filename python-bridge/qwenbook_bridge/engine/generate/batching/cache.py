"""The key/value cache of a running batch whose rows started at different times.

Rows are right-aligned: every row's real tokens end at the last column, and shorter rows are padded on
the left with zeros. A 2-D attention mask marks the real columns, so padding is never attended to, and
the scheduler passes per-row position ids, so rotary positions stay each row's own.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class PaddedBatchCache:
    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, columns], 1 for real tokens

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, cache: DynamicCache, length: int) -> None:
        """Append a row prefilled on its own (batch of one, `length` tokens), padding whichever side is shorter."""
        device = cache.layers[0].keys.device
        new_mask = torch.ones((1, length), dtype=torch.long, device=device)
        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, new_mask
            return
        new_kv = [(layer.keys, layer.values) for layer in cache.layers]
        width = self.width
        if length < width:
            new_kv = [(_pad_left(k, width - length), _pad_left(v, width - length)) for k, v in new_kv]
            new_mask = _pad_left(new_mask, width - length)
        elif length > width:
            for layer in self.cache.layers:
                layer.keys = _pad_left(layer.keys, length - width)
                layer.values = _pad_left(layer.values, length - width)
            self.mask = _pad_left(self.mask, length - width)
        for layer, (k, v) in zip(self.cache.layers, new_kv):
            layer.keys = torch.cat([layer.keys, k], dim=0)
            layer.values = torch.cat([layer.values, v], dim=0)
        self.mask = torch.cat([self.mask, new_mask], dim=0)

    def mask_for_next_step(self) -> torch.Tensor:
        """Grow the mask by the column the coming decode step writes (real in every row) and return it."""
        assert self.mask is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)
        return self.mask

    def keep(self, rows: list[int], longest: int) -> None:
        """Keep only `rows` (indices); `longest` is the most tokens any kept row holds. Columns left of it
        are padding in every kept row and are trimmed."""
        if not rows:
            self.clear()
            return
        assert self.cache is not None and self.mask is not None
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        trim = self.width - longest
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:, :]
            layer.values = layer.values.index_select(0, index)[:, :, trim:, :]
        self.mask = self.mask.index_select(0, index)[:, trim:]

    def clear(self) -> None:
        self.cache = self.mask = None


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad the sequence axis (dim 2 of a [B, H, T, D] cache, dim 1 of a [B, T] mask) on the left."""
    dim = 2 if t.dim() == 4 else 1
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)
