"""What each request does, apart from sockets and framing: dispatch.py is the table from request type to
handler, context.py what every handler shares (the job, the sessions, the lock that parks a served model), and one
module a capability (adapters, train, export, serve). paths.py checks the client's paths; run_registry.py keeps
the training runs, in memory and in the on-disk index that outlives the worker; engine_caches.py reports the paged
engines' key/value caches to status and the memory telemetry."""

# The modules other packages may import; the rest are this package's own (tests/test_architecture.py).
__all__ = ["context", "dispatch", "paths", "run_registry"]
