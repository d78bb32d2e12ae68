"""Decoding: generation.py is a chat request from messages to reply, chat_prompt.py its prompt (messages, tools,
thinking) through the model's template and reply_parts.py the reply split into reasoning, answer and tool calls
(both shared with the OpenAI server), sampling.py the one sampler and its options, streaming.py text from token
ids as they come, chat_engine.py each model's paged engine for notebook chat, fast_decode.py (with fast_ops.py)
the static-cache decoder and decoders.py which loop a chat the chat engine cannot take gets. paged/ is the engine
that decodes many requests together over a block-paged key/value cache (the HTTP server's and the chat engine's);
batching/ is the padded scheduler the server falls back to for a model the paged runner cannot read."""

# The modules other packages may import; the rest are this package's own (tests/test_architecture.py).
__all__ = ["batching", "chat_engine", "chat_prompt", "decoders", "fast_decode", "generation", "paged", "reply_parts",
           "sampling", "streaming"]
