"""LoRA adapters on resident models (`adapter_load`, `adapter_unload`, `adapter_list`), and the wrapper that runs
save/export on a model with its loaded adapters taken off. Paths must be absolute: the notebook API resolves them
against the notebook's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qwenbook_bridge.engine.models.adapter_registry import AdapterRegistry, folder_stamp
from qwenbook_bridge.engine.models.loading import ModelRegistry
from qwenbook_bridge.handlers.context import Exclusive, JobContext, JobHandler, no_exclusive
from qwenbook_bridge.handlers.paths import resolve_user_path
from qwenbook_bridge.protocol import json_clean


def _adapter_dict(info: Any) -> dict[str, Any]:
    d = info.to_dict()
    d.pop("active", None)  # requests pick their adapter; none is "active" between them
    return json_clean(d)


class AdapterHandlers:
    def __init__(self, registry: ModelRegistry, adapters: AdapterRegistry, exclusive: Exclusive = no_exclusive,
                 root: Path | None = None) -> None:
        self.registry = registry
        self.adapters = adapters
        self.exclusive = exclusive
        self.root = root  # client paths must resolve inside it (paths.py); None: anywhere

    def jobs(self) -> dict[str, JobHandler]:
        return {"adapter_load": self.adapter_load, "adapter_unload": self.adapter_unload,
                "adapter_list": self.adapter_list}

    def bare(self, handler: JobHandler) -> JobHandler:
        """`handler` run with the request's model free of loaded adapters (save/export merge their own)."""
        def run(job: JobContext) -> dict[str, Any]:
            model_id = job.request.content.get("model_id")
            manager = self.adapters.existing(model_id) if isinstance(model_id, str) else None
            if manager is None or not manager.names():
                return handler(job)
            # A served model's batch must not decode while its adapters come off and go back on.
            with self.exclusive(model_id), manager.suspended():
                return handler(job)
        return run

    def adapter_load(self, job: JobContext) -> dict[str, Any]:
        content = job.request.content
        loaded = self.registry.get(content["model_id"])
        folder = resolve_user_path(content["path"], self.root, "path").resolve()
        manager = self.adapters.manager(loaded)
        name = content.get("name")
        stamp = folder_stamp(folder)
        reloaded = False
        with self.exclusive(loaded.model_id):
            known = next((i for i in manager.list() if i.path == str(folder) and name in (None, i.name)), None)
            if known is not None and self.adapters.stamp(loaded.model_id, known.name) != stamp:
                # The folder was written again (a new run into the same output): load what is there now.
                manager.unload(known.name)
                name, reloaded = known.name, True
            info = manager.load(folder, name, activate=False)
        self.adapters.set_stamp(loaded.model_id, info.name, stamp)
        return {"status": "ok", "adapter": _adapter_dict(info), "reloaded": reloaded,
                "adapters": [_adapter_dict(i) for i in manager.list()]}

    def adapter_unload(self, job: JobContext) -> dict[str, Any]:
        content = job.request.content
        loaded = self.registry.get(content["model_id"])
        manager = self.adapters.existing(loaded.model_id)
        unloaded = manager is not None and content["name"] in manager.names()
        if unloaded:
            with self.exclusive(loaded.model_id):
                manager.unload(content["name"])
            self.adapters.set_stamp(loaded.model_id, content["name"], None, drop=True)
        return {"status": "ok", "unloaded": unloaded,
                "adapters": [_adapter_dict(i) for i in manager.list()] if manager else []}

    def adapter_list(self, job: JobContext) -> dict[str, Any]:
        loaded = self.registry.get(job.request.content["model_id"])
        manager = self.adapters.existing(loaded.model_id)
        return {"status": "ok", "adapters": [_adapter_dict(i) for i in manager.list()] if manager else []}
