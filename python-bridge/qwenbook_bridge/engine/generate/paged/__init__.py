"""The paged decode engine: one key/value cache in fixed-size blocks shared by every running sequence.

blocks.py owns the blocks (allocation, reference counts, prefix caching keyed by token content, the memory
budget), runner.py runs the model over the paged cache for a step of mixed prefill chunks and decode tokens,
and scheduler.py is the engine a caller holds (admission, chunked prefill, preemption, per-row sampling), a
drop-in for batching/'s BatchScheduler. attention.py is decode attention that reads the blocks in place (a
Triton split-K kernel in attention_kernels.py on CUDA, a PyTorch reference elsewhere). decode_step.py is the
runner's decode-only step over fixed buffers, captured as one CUDA graph per batch-size bucket (with stacked
per-row LoRA); chunks.py is the runner's input unit, SeqChunk."""

# The modules other packages may import; the rest are this package's own (tests/test_architecture.py).
__all__ = ["attention", "blocks", "chunks", "runner", "scheduler"]
