"""`python -m qwenbook_bridge` starts the worker (same options as `python -m qwenbook_bridge.worker`)."""

from qwenbook_bridge.worker.process import run

run()
