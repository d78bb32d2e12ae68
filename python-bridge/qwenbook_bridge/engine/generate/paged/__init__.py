"""The paged decode engine: one key/value cache in fixed-size blocks shared by every running sequence.

blocks.py owns the blocks (allocation, reference counts, prefix caching keyed by token content, the memory
budget), runner.py runs the model over the paged cache for a step of mixed prefill chunks and decode tokens,
and scheduler.py is the engine a caller holds (admission, chunked prefill, preemption, per-row sampling), a
drop-in for batching/'s BatchScheduler. attention.py is decode attention that reads the blocks in place (a
Triton split-K kernel in attention_kernels.py on CUDA, a PyTorch reference elsewhere)."""

# The modules other packages may import; the rest are this package's own (tests/test_architecture.py).
__all__ = ["attention", "blocks", "runner", "scheduler"]
