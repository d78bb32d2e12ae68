"""Decoding: generation.py is a chat request from messages to reply, sampling.py the one sampler and its
options, streaming.py text from token ids as they come, fast_decode.py (with fast_ops.py) the static-cache decoder
and decoders.py which loop a model gets; batching/ decodes many requests together for the HTTP server."""

# The modules other packages may import; the rest are this package's own (tests/test_architecture.py).
__all__ = ["decoders", "fast_decode", "generation", "sampling", "streaming"]
