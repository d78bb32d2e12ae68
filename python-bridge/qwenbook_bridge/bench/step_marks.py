"""Marks between training steps, for the benches that time steps one by one (train_run.py, preference.py).

On CUDA a mark is an event recorded on the stream, so a step's time is what the device spent on it, not when the
host got ahead; on the CPU it is the clock."""

from __future__ import annotations

import time
from typing import Any

import torch


def mark(cuda: bool) -> Any:
    if cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def elapsed(a: Any, b: Any, cuda: bool) -> float:
    """Seconds from mark a to mark b (on CUDA, once both have been reached: synchronize first)."""
    return a.elapsed_time(b) / 1000 if cuda else b - a
