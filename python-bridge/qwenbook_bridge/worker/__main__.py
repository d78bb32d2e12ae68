"""`python -m qwenbook_bridge.worker`: the worker process (worker/process.py)."""

from qwenbook_bridge.worker.process import run

run()
