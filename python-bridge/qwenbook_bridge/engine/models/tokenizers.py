"""Tokenizers read once per folder and shared by the models loaded from it.

Reading a Qwen tokenizer costs more than the tiny model's weights: transformers parses the 11 MB tokenizer.json in
Python and builds the vocabulary and merges before the Rust tokenizer (about a second idle, 10 s on a busy two-core
machine). A worker reads the same folder again for each dtype, each int8/int4 copy and after every kernel restart.
Nothing in the worker changes a tokenizer after loading it (chats on one model already share theirs), so a folder
whose files are unchanged gives back the tokenizer read before; a file rewritten in it (a folder saved again with
overwrite) changes its size or time and reads afresh.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

# Weight files have no part in the tokenizer, and hashing their metadata would only cost time.
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# A handful of folders: a notebook holds a few models at once; each tokenizer is tens of MB of Python objects.
_KEEP = 4

_lock = threading.Lock()
_cache: OrderedDict[tuple[Any, ...], Any] = OrderedDict()


def _signature(folder: Path) -> tuple[Any, ...]:
    """The folder and the name, size and modification time of every file in it but the weights."""
    files = []
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHTS):
            st = f.stat()
            files.append((f.name, st.st_size, st.st_mtime_ns))
    return (str(folder.resolve()), tuple(files))


def load_tokenizer(folder: Path) -> Any:
    """`AutoTokenizer.from_pretrained(folder)`, or the one read from the same unchanged folder before."""
    from transformers import AutoTokenizer

    key = _signature(folder)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with _lock:
        _cache[key] = tokenizer
        while len(_cache) > _KEEP:
            _cache.popitem(last=False)
    return tokenizer
