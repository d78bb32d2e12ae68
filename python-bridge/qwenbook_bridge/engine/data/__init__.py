"""Training data: datasets.py reads alpaca/sharegpt/messages rows from files and mixes sources,
self_cognition.py writes the "who are you" set, chat_encoding.py renders rows through the chat template and masks
what is not trained on; preference_data.py reads and encodes chosen/rejected pairs."""

# The modules other packages may import; the rest are this package's own (tests/test_architecture.py).
__all__ = ["chat_encoding", "datasets", "preference_data"]
