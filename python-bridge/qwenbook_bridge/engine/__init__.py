"""The model engine: loading, generation and device memory. Runs without pyzmq (GPU hosts may lack it)."""

from .errors import (CancelledError, DeviceUnavailableError, EngineError, InvalidOptionError, ModelNotFoundError,
                     ModelNotLoadedError, NoChatTemplateError, NotACausalLMError)
from .generation import GenerationOptions, GenerationResult, TokenDelta, generate
from .gpu import available_devices, memory_snapshot, resolve_device
from .loading import LoadedModel, LoadOptions, LoadProgress, ModelRegistry, load_model

__all__ = [
    "CancelledError", "DeviceUnavailableError", "EngineError", "InvalidOptionError", "ModelNotFoundError",
    "ModelNotLoadedError", "NoChatTemplateError", "NotACausalLMError",
    "GenerationOptions", "GenerationResult", "TokenDelta", "generate",
    "available_devices", "memory_snapshot", "resolve_device",
    "LoadedModel", "LoadOptions", "LoadProgress", "ModelRegistry", "load_model",
]
