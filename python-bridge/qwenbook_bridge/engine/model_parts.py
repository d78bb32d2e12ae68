"""What a model is made of, seen through the wrappers put around it: the transformers model under a peft
wrapper, whether LoRA (or any peft tuner) layers are in it, and an empty skeleton to load weights into. Quantizing, merging and
exporting all need these, so they live below all three."""

from __future__ import annotations

from typing import Any

from torch import nn


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (with its LoRA layers in place), or the model itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in base_model_of(model).modules())


def has_injected_adapters(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def empty_model(config: Any) -> nn.Module:
    """A model skeleton whose parameters live on the meta device (its non-persistent buffers are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)
