"""Each resident model's LoRA adapters, kept apart from any one kind of request: chat picks one per request,
export and training take them off for a while, unloading the model drops them.

Each resident model gets one `AdapterManager`. Adapters are loaded inactive; a generate request names the one
it wants (or none, for the base), so switching costs no reload and two notebooks cannot change each other's
active adapter.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qwenbook_bridge.engine.models.adapters import AdapterManager
from qwenbook_bridge.engine.models.loading import LoadedModel

_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

Stamp = tuple[int, int] | None


def folder_stamp(folder: Path) -> Stamp:
    """When and how big the adapter's weights are, to notice a folder rewritten by a later run."""
    for name in _WEIGHT_FILES:
        f = folder / name
        if f.is_file():
            st = f.stat()
            return st.st_mtime_ns, st.st_size
    return None


class AdapterRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._managers: dict[str, AdapterManager] = {}
        self._stamps: dict[tuple[str, str], Stamp] = {}

    def manager(self, loaded: LoadedModel) -> AdapterManager:
        """The model's manager, made on first use."""
        with self._lock:
            current = self._managers.get(loaded.model_id)
            if current is None or current.model is not loaded.model:  # a model unloaded and loaded again
                current = self._managers[loaded.model_id] = AdapterManager(loaded.model)
            return current

    def existing(self, model_id: str) -> AdapterManager | None:
        with self._lock:
            return self._managers.get(model_id)

    def has_adapters(self, model_id: str) -> bool:
        manager = self.existing(model_id)
        return manager is not None and bool(manager.names())

    def forget(self, model_id: str) -> None:
        """The model is being unloaded: drop its adapters (and the manager's reference to the weights)."""
        with self._lock:
            self._managers.pop(model_id, None)
            for key in [k for k in self._stamps if k[0] == model_id]:
                del self._stamps[key]

    def stamp(self, model_id: str, name: str) -> Stamp:
        """The weights' stamp when adapter `name` was loaded (see folder_stamp)."""
        with self._lock:
            return self._stamps.get((model_id, name))

    def set_stamp(self, model_id: str, name: str, stamp: Stamp | None, *, drop: bool = False) -> None:
        with self._lock:
            if drop:
                self._stamps.pop((model_id, name), None)
            else:
                self._stamps[(model_id, name)] = stamp

    @contextmanager
    def adapter_scope(self, loaded: LoadedModel, name: str | None) -> Iterator[None]:
        """The model as a generate request asked for it: with adapter `name`, or the bare base for None."""
        manager = self.existing(loaded.model_id) if name is None else self.manager(loaded)
        if manager is None or (name is None and not manager.names()):
            yield
            return
        with manager.using(name):
            yield

    @contextmanager
    def without_adapters(self, model_id: str) -> Iterator[None]:
        """Take the model's adapters off for the block (saving, exporting, training act on the bare base)."""
        manager = self.existing(model_id)
        if manager is None or not manager.names():
            yield
            return
        with manager.suspended():
            yield
