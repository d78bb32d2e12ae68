"""Qwenbook's Python side, in layers that import only downward:

    worker/  the process and its ZeroMQ server        (imports handlers, protocol)
    handlers/  what each request does                 (imports engine, distributed, openai, protocol)
    openai/  the OpenAI-compatible HTTP server        (imports engine)
    distributed/  one training run over several ranks (imports engine)
    engine/  torch, transformers and peft; no sockets  (imports nothing above it)

beside protocol.py (messages, signatures and the schema they follow, schema/protocol.json), tiny.py (tiny random
Qwen models for tests) and bench/ (benchmarks, which nothing imports). ARCHITECTURE.md at the repository root
draws the whole picture.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = "1.0"
