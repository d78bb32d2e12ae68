"""The OpenAI-compatible HTTP server: server.py runs it on a thread beside the worker (or alone from cli.py,
`python -m qwenbook_bridge.openai.cli`), routes.py answers /v1/chat/completions, /v1/completions and
/v1/models, and schema.py turns request bodies into the engine's options and its results into response
bodies and OpenAI-shaped errors."""

# The modules other packages may import; the rest are this package's own (tests/test_architecture.py).
__all__ = ["server"]
