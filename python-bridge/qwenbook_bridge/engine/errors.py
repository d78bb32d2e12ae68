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
