"""A one-line refusal for the commands that only make sense on CUDA GPUs.

Without it they fail late and badly on a machine without one: a CUDA call's traceback, or a Qwen2.5-7B-shaped
model built in fp32 on the CPU until the memory runs out. The line says what is missing and what runs instead.
"""

from __future__ import annotations

import sys

import torch


def require_cuda(command: str, *, gpus: int = 1, instead: str = "") -> None:
    """Exits with status 1 and one line on stderr unless `gpus` CUDA devices are visible."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have >= gpus:
        return
    need = "a CUDA GPU" if gpus == 1 else f"{gpus} CUDA GPUs"
    found = "none found" if have == 0 else f"{have} found"
    print(f"{command}: needs {need} ({found})" + (f"; {instead}" if instead else ""), file=sys.stderr, flush=True)
    raise SystemExit(1)
