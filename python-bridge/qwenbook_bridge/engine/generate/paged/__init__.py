"""The paged decode engine: one key/value cache in fixed-size blocks shared by every running sequence.

blocks.py owns the blocks (allocation, reference counts, prefix caching keyed by token content, the memory
budget), runner.py runs the model over the paged cache for a step of mixed prefill chunks and decode tokens,
and scheduler.py is the engine a caller holds (admission, chunked prefill, preemption, per-row sampling), a
drop-in for batching/'s BatchScheduler."""

# The modules other packages may import; the rest are this package's own (tests/test_architecture.py).
__all__ = ["blocks", "runner", "scheduler"]
