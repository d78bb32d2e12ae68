"""Files that are either complete or absent: atomic_write.py writes to a hidden sibling and renames it into
place, checking free space first; save.py writes sharded safetensors with progress."""

# The modules other packages may import; the rest are this package's own (tests/test_architecture.py).
__all__ = ["atomic_write", "save"]
