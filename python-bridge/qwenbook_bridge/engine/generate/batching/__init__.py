"""Continuous batching for the HTTP server: scheduler.py admits requests into a running batch and steps it,
cache.py holds the batch's key/value cache, requests.py is what a caller holds while its request runs, and
engine_thread.py is the thread that owns the model, which this scheduler and paged/'s engine both build on."""

# The modules other packages may import; the rest are this package's own (tests/test_architecture.py).
__all__ = ["engine_thread", "requests", "scheduler"]
