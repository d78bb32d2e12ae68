"""The model engine: everything torch, transformers and peft do for Qwenbook, with no sockets and no pyzmq (GPU
hosts may lack it). models/ loads and holds models and their adapters, generate/ decodes, data/ reads training
data, train/ fine-tunes, quant/ quantizes, export/ writes models out, files/ writes files atomically; errors.py
names what can go wrong and model_parts.py what a model is made of under its wrappers. The names below are the
ones a caller needs most; the subpackages' own faces list the rest. (`generate` is the subpackage: the function
that answers a chat is engine.generate.generation.generate.)"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from qwenbook_bridge.engine.errors import (CancelledError, DeviceUnavailableError, EngineError, InvalidOptionError,
    ModelNotFoundError, ModelNotLoadedError, NoChatTemplateError, NotACausalLMError)

if TYPE_CHECKING:
    from qwenbook_bridge.engine.generate.generation import GenerationResult, TokenDelta
    from qwenbook_bridge.engine.generate.sampling import SamplingParams
    from qwenbook_bridge.engine.models.devices import available_devices, memory_snapshot, resolve_device
    from qwenbook_bridge.engine.models.loading import LoadedModel, LoadOptions, LoadProgress, ModelRegistry, load_model

# The names that need torch and transformers are imported on first use: a process that only needs the errors
# (a command refusing its options, a Ray actor unpickling a task of distributed/ray_train.py) then starts in a
# fraction of a second instead of the ~3 s those imports take.
_LAZY = {
    "GenerationResult": "generate.generation", "TokenDelta": "generate.generation",
    "SamplingParams": "generate.sampling",
    "available_devices": "models.devices", "memory_snapshot": "models.devices", "resolve_device": "models.devices",
    "LoadedModel": "models.loading", "LoadOptions": "models.loading", "LoadProgress": "models.loading",
    "ModelRegistry": "models.loading", "load_model": "models.loading",
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{where}"), name)
    globals()[name] = value
    return value

__all__ = [
    "CancelledError", "DeviceUnavailableError", "EngineError", "InvalidOptionError", "ModelNotFoundError",
    "ModelNotLoadedError", "NoChatTemplateError", "NotACausalLMError",
    "GenerationResult", "SamplingParams", "TokenDelta",
    "available_devices", "memory_snapshot", "resolve_device",
    "LoadedModel", "LoadOptions", "LoadProgress", "ModelRegistry", "load_model",
    # modules and subpackages other packages may import
    "errors", "model_parts", "data", "export", "files", "generate", "models", "quant", "train",
]
