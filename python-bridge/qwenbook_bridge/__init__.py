"""Qwenbook's Python side: the engine (torch/transformers/peft) and the ZeroMQ worker that serves it."""

__version__ = "0.1.0"
PROTOCOL_VERSION = "1.0"
