"""Models held in memory: loading.py loads a local folder or hub id (hub.py) onto devices (devices.py,
device_map.py) and keeps the registry of resident models; adapters.py puts LoRA adapters on a model and
adapter_registry.py keeps each resident model's adapters for every kind of request."""

# The modules other packages may import; the rest are this package's own (tests/test_architecture.py).
__all__ = ["adapter_registry", "adapters", "device_map", "devices", "hub", "loading"]
