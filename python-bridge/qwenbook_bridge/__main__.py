"""`python -m qwenbook_bridge` starts the worker (same options as `python -m qwenbook_bridge.worker`)."""

from .worker import run

run()
