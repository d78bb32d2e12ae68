"""How a model is to be quantized (method, group size, GPTQ calibration), checked before any work starts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qwenbook_bridge.engine.quant.codes import GROUP_SIZES

METHODS = ("int8", "int4", "nf4")


class QuantBackendMissing(ImportError):
    """A quantization method needs a library that is not installed."""


@dataclass
class QuantConfig:
    # "int8" (per-channel), "int4" (group-wise), or "nf4" (needs bitsandbytes).
    method: str = "int8"
    # int4 only. Smaller groups follow the weights more closely and cost more scales: 4.5 / 4.25 / 4.125 bits
    # per weight with 16-bit scales for 32 / 64 / 128.
    group_size: int = 128
    # int4 only: texts (or a .txt / .json / .jsonl file of them) for GPTQ rounding; None rounds to nearest.
    calibration: Sequence[str] | str | None = None
    calibration_max_length: int = 512
    calibration_max_samples: int = 128
    # GPTQ's Hessian damping, as a fraction of its mean diagonal: 0.01 is the paper's value.
    damp: float = 0.01
    # The output layer is the most sensitive one and tied to the embeddings in small Qwen models: keep it.
    include_lm_head: bool = False

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization {self.method!r}: use one of {', '.join(METHODS)}")
        if self.method == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size {self.group_size} is not supported: use 32, 64 or 128")
        if self.calibration is not None and self.method != "int4":
            raise ValueError(f"calibration (GPTQ) applies to int4 only, not {self.method}")
        if not 0 < self.damp < 1:
            raise ValueError("damp must be between 0 and 1 (0.01 is usual)")
        if self.calibration_max_length < 8 or self.calibration_max_samples < 1:
            raise ValueError("calibration_max_length must be >= 8 and calibration_max_samples >= 1")
