"""Which decode loop a chat request runs on: FastDecoder (static KV cache, one CUDA graph per step) for a
whole Qwen model on one GPU, the plain transformers forward loop for everything else.

`QWENBOOK_FAST_DECODE` chooses: "auto" (the default: on CUDA), "1" (also on the CPU, where it runs the same
functions eagerly: same tokens, no gain; the tests use it), "0" (never). The plain loop stays in charge of
models spread over several devices, models with a LoRA adapter switched on in their layers and architectures the fast
decoder does not implement (int8/int4 layers run their own packed kernels inside it); a decoder that cannot
be built (out of memory) is not tried again for that model.

One decoder is kept per model object (dropped with it) and grown when a request needs more cache slots than
it has; its cache is sized to the requests seen, not to the model's whole context.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any

import torch

from qwenbook_bridge.engine.generate.fast_decode import FastDecoder

log = logging.getLogger(__name__)

_MIN_SLOTS = 2048
_decoders: weakref.WeakKeyDictionary[Any, FastDecoder | None] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _mode() -> str:
    value = os.environ.get("QWENBOOK_FAST_DECODE", "auto").strip().lower()
    return value if value in ("auto", "1", "0") else "auto"


def _eligible(model: Any, device: torch.device) -> bool:
    mode = _mode()
    if mode == "0" or (mode == "auto" and device.type != "cuda"):
        return False
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        return False
    from qwenbook_bridge.engine.generate.fast_ops import adapters_active

    # A switched-on adapter layer adds to its projection, which a decoder reading the base weights would ignore;
    # layers of adapters loaded but not in use compute the base function, which the decoder reads under them.
    return not adapters_active(model)


def decoder_for(model: Any, device: torch.device, slots: int, context: int) -> FastDecoder | None:
    """A FastDecoder for `model` with at least `slots` cache positions, or None for the plain loop."""
    if not _eligible(model, device):
        return None
    with _lock:
        known = _decoders.get(model, False)
        if known is None:  # tried before and refused: the model's layers or memory do not allow it
            return None
        if isinstance(known, FastDecoder) and known.max_seq_len >= slots:
            return known
        size = max(_MIN_SLOTS, slots, 2 * known.max_seq_len if isinstance(known, FastDecoder) else 0)
        size = min(size, context) if context else size
        if size < slots:
            return None
        _decoders.pop(model, None)  # let a smaller decoder's cache go before the larger one is made
        del known
        try:
            decoder = FastDecoder(model, max_seq_len=size, batch_size=1)
        except (TypeError, ValueError) as e:  # a layout the fast decoder does not implement
            log.info("plain decode loop for %s: %s", type(model).__name__, e)
            _decoders[model] = None
            return None
        except torch.OutOfMemoryError:
            log.warning("no memory for the fast decoder's %d-slot cache; using the plain decode loop", size)
            _decoders[model] = None
            torch.cuda.empty_cache()
            return None
        _decoders[model] = decoder
        return decoder


def forget(model: Any) -> None:
    """Drop the model's decoder (its cache and captured graphs), e.g. before its weights are replaced."""
    with _lock:
        _decoders.pop(model, None)
