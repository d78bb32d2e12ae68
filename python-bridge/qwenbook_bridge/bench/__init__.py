"""Benchmarks, each a command (`python -m qwenbook_bridge.bench` is the decode benchmark in decode.py; the others
are `python -m qwenbook_bridge.bench.<name>`). They use the engine as a user would; nothing else imports them."""

# The modules other packages may import; the rest are this package's own (tests/test_architecture.py).
__all__ = []
