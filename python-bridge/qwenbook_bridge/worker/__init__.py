"""The worker process: `python -m qwenbook_bridge.worker` (process.py) starts one ZeroMQ server (server.py) on a
user-only socket, checks every message's signature, and runs each request on the job lane of its model
(job_lanes.py) through the dispatch table in handlers/. Nothing below this package knows about sockets."""

# The modules other packages may import; the rest are this package's own (tests/test_architecture.py).
__all__ = ["process"]
