"""Errors a user can act on.

Each message says what was wrong and how to fix it; the worker sends the class name as `ename` and the
message as `evalue`, so the notebook shows them as they are.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class for mistakes in what was asked (as opposed to bugs)."""


class ModelNotFoundError(EngineError):
    """The model folder does not exist, or a hub id is neither cached nor downloadable."""


class NotACausalLMError(EngineError):
    """The folder holds something other than a causal language model."""


class NoChatTemplateError(EngineError):
    """The tokenizer has no chat template, so chat messages cannot be turned into a prompt."""


class DeviceUnavailableError(EngineError):
    """The requested device (or dtype on that device) is not available in this process."""


class InvalidOptionError(EngineError, ValueError):
    """An option has a value the engine cannot use."""


class ModelNotLoadedError(EngineError):
    """A request named a model handle that is not loaded."""


class CancelledError(EngineError):
    """The request was cancelled before it could produce anything."""


class GenerationOutOfMemoryError(EngineError):
    """The device ran out of memory while generating; the message says what to change."""


# How allocators word running out: CUDA ("CUDA out of memory"), the CPU allocator ("can't allocate memory",
# "not enough memory"), MPS and the OS ("Cannot allocate memory").
_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _OOM_WORDS)


def first_sentences(e: BaseException, limit: int = 240) -> str:
    """The start of an allocator's message: CUDA's goes on for several sentences of allocator statistics."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ". ".join(text.split(". ")[:2]).rstrip(".")[:limit]


class InsufficientDiskSpaceError(EngineError, OSError):
    """The target's filesystem has no room for the output (found before writing, or as ENOSPC / EDQUOT while
    writing); the message names the target, what it needed and what is free. Nothing was left under its name."""


class MissingPackageError(EngineError):
    """An option needs a Python package the worker's Python does not have; the message says what to install."""
