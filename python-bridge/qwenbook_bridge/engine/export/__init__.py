"""Writing a model out: merge.py folds LoRA into the base and writes safetensors, quantized.py writes int8/int4
folders, gguf.py (with gguf_read.py to check the result) writes llama.cpp files, resident.py saves a model held in
the worker, whichever way it was loaded."""

# The modules other packages may import; the rest are this package's own (tests/test_architecture.py).
__all__ = ["gguf", "merge", "resident"]
