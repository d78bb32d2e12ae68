"""Weight-only quantization: config.py says how, quantize.py swaps linear layers for the int8/int4 layers of
layers.py (codes.py rounds, gptq.py rounds with calibration), triton_ops.py picks the packed kernels
(triton_kernels.py) on CUDA and cpu_ops.py runs them on the CPU, folder.py reads a quantized folder back, at_load.py quantizes while loading and quality.py
measures what it cost."""

# The modules other packages may import; the rest are this package's own (tests/test_architecture.py).
__all__ = ["at_load", "codes", "config", "folder", "layers", "quality", "quantize", "triton_ops"]
