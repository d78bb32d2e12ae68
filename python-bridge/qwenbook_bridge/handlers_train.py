"""Fine-tuning requests (`train`, `train_preview`) and LoRA adapters on resident models (`adapter_*`).

`train` runs on a thread of its own (the server starts one for each request type in BACKGROUND), so a long run
blocks neither control requests nor work on other models; requests for the model being trained wait for it
(the server defers them). The engine gives the caller's model back unchanged, so the base model keeps serving
once the run ends, however it ends (completed, cancelled, out of memory).

Each resident model gets one `AdapterManager`. Adapters are loaded inactive; a generate request names the one
it wants (or none, for the base), so switching costs no reload and two notebooks cannot change each other's
active adapter. Paths must be absolute: the notebook API resolves them against the notebook's folder.

Every run is recorded in a `RunRegistry` (run_registry.py): `runs` lists them and `run_watch` replays a run's
events and follows it, so a kernel restarted mid-run can redraw its dashboard.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .distributed_train import distributed_launcher
from .engine import CancelledError, EngineError, LoadedModel, ModelRegistry
from .paths import resolve_user_path
from .run_registry import RunRegistry

if TYPE_CHECKING:
    from .engine.adapters import AdapterManager
    from .engine.data import DatasetSpec
    from .handlers import JobContext

# Requests the server runs on their own thread rather than the shared job thread (a watch lasts as long as its run).
BACKGROUND = frozenset({"train", "run_watch"})
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
Exclusive = Callable[[str], AbstractContextManager[None]]


class UnknownRunError(EngineError):
    """run_watch named a run this worker does not know (another worker's, or one long forgotten)."""


def _no_exclusive(_: str) -> AbstractContextManager[None]:
    return nullcontext()


def json_clean(value: Any) -> Any:
    """Event and reply content as the schema has it: no None fields, tuples as lists, no NaN/Infinity (which
    JSON cannot carry; a non-finite number is left out like a missing one)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            v = json_clean(v)
            if v is not None:
                out[k] = v
        return out
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def resolved_datasets(items: list[dict[str, Any]], root: Path | None = None) -> list[dict[str, Any]]:
    """The request's datasets with their paths made absolute and checked (as the ranks of a run also read them)."""
    return [{**item, "path": str(resolve_user_path(item["path"], root, f"datasets[{i}].path"))}
            if item.get("path") is not None else dict(item) for i, item in enumerate(items)]


def dataset_specs(items: list[dict[str, Any]], root: Path | None = None) -> list[DatasetSpec]:
    from .engine.data import DatasetSpec

    return [DatasetSpec.from_dict(item) for item in resolved_datasets(items, root)]


def _stamp(folder: Path) -> tuple[int, int] | None:
    """When and how big the adapter's weights are, to notice a folder rewritten by a later run."""
    for name in _WEIGHT_FILES:
        f = folder / name
        if f.is_file():
            st = f.stat()
            return st.st_mtime_ns, st.st_size
    return None


def _adapter_dict(info: Any) -> dict[str, Any]:
    d = info.to_dict()
    d.pop("active", None)  # requests pick their adapter; none is "active" between them
    return json_clean(d)


def resume_recipe(loaded: LoadedModel, content: dict[str, Any], options: dict[str, Any],
                  datasets: list[dict[str, Any]]) -> dict[str, Any]:
    """What a client needs to continue the run after the worker is gone: how to load the model again and the
    train request with its paths resolved (the run index keeps it; the client adds resume_from)."""
    info = loaded.info
    load = {"model": loaded.source, "dtype": info.get("dtype", "auto"), "device": info.get("device", "auto")}
    # Without resume_from and overwrite: the client names the checkpoint, and overwrite would delete it.
    config = {k: v for k, v in options.items() if k not in ("resume_from", "overwrite")}
    train: dict[str, Any] = {"config": config, "datasets": datasets}
    if content.get("distributed") is not None:
        train["distributed"] = content["distributed"]
    return {"load": load, "train": json_clean(train)}


class TrainHandlers:
    def __init__(self, registry: ModelRegistry, exclusive: Exclusive = _no_exclusive, root: Path | None = None) -> None:
        self.registry = registry
        self.root = root  # client paths must resolve inside it (paths.py); None: anywhere
        # Holds a served model's HTTP batch scheduler parked while a job changes the model (LoRA layers in it).
        self.exclusive = exclusive
        self._lock = threading.Lock()
        self._managers: dict[str, AdapterManager] = {}
        self._stamps: dict[tuple[str, str], tuple[int, int] | None] = {}
        self.runs = RunRegistry()  # what a restarted kernel lists and re-attaches to

    def jobs(self) -> dict[str, Callable[[JobContext], dict[str, Any]]]:
        return {"train": self.train, "train_preview": self.preview, "adapter_load": self.adapter_load,
                "adapter_unload": self.adapter_unload, "adapter_list": self.adapter_list, "run_watch": self.watch}

    def controls(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        return {"runs": lambda _content: {"status": "ok", "runs": self.runs.list()}}

    def watch(self, job: JobContext) -> dict[str, Any]:
        try:
            run = self.runs.watch(job.request.content["run_id"], job.emit, job.cancel)
        except KeyError as e:
            raise UnknownRunError(e.args[0]) from None
        return {"status": "ok", "run": run}

    # ------------------------------------------------------------ adapters as other handlers see them

    def manager(self, loaded: LoadedModel) -> AdapterManager:
        from .engine.adapters import AdapterManager

        with self._lock:
            current = self._managers.get(loaded.model_id)
            if current is None or current.model is not loaded.model:  # a model unloaded and loaded again
                current = self._managers[loaded.model_id] = AdapterManager(loaded.model)
            return current

    def _existing(self, model_id: str) -> AdapterManager | None:
        with self._lock:
            return self._managers.get(model_id)

    def forget(self, model_id: str) -> None:
        """The model is being unloaded: drop its adapters (and the manager's reference to the weights)."""
        with self._lock:
            self._managers.pop(model_id, None)
            for key in [k for k in self._stamps if k[0] == model_id]:
                del self._stamps[key]

    @contextmanager
    def adapter_scope(self, loaded: LoadedModel, name: str | None) -> Iterator[None]:
        """The model as a generate request asked for it: with adapter `name`, or the bare base for None."""
        manager = self._existing(loaded.model_id) if name is None else self.manager(loaded)
        if manager is None or (name is None and not manager.names()):
            yield
            return
        with manager.using(name):
            yield

    @contextmanager
    def without_adapters(self, model_id: str) -> Iterator[None]:
        """Take the model's adapters off for the block (saving, exporting, training act on the bare base)."""
        manager = self._existing(model_id)
        if manager is None or not manager.names():
            yield
            return
        with manager.suspended():
            yield

    def bare(self, handler: Callable[[JobContext], dict[str, Any]]) -> Callable[[JobContext], dict[str, Any]]:
        """`handler` run with the request's model free of loaded adapters (save/export merge their own)."""
        def run(job: JobContext) -> dict[str, Any]:
            model_id = job.request.content.get("model_id")
            manager = self._existing(model_id) if isinstance(model_id, str) else None
            if manager is None or not manager.names():
                return handler(job)
            # A served model's batch must not decode while its adapters come off and go back on.
            with self.exclusive(model_id), manager.suspended():
                return handler(job)
        return run

    # ------------------------------------------------------------ train / train_preview

    def train(self, job: JobContext) -> dict[str, Any]:
        from .engine.data import DatasetSpec
        from .engine.training import train
        from .engine.training_config import TrainConfig

        content = job.request.content
        loaded = self.registry.get(content["model_id"])
        options = dict(content["config"])
        for name in ("output_dir", "resume_from"):
            if options.get(name) is not None:
                options[name] = str(resolve_user_path(options[name], self.root, f"config.{name}"))
        config = TrainConfig.from_dict(options)
        config.validate()
        datasets = resolved_datasets(content["datasets"], self.root)
        specs = [DatasetSpec.from_dict(d) for d in datasets]
        if job.cancel.is_set():
            raise CancelledError("the training run was cancelled before it started; nothing was written")

        distributed = content.get("distributed")
        launch = None if distributed is None else distributed_launcher(distributed, loaded, config, datasets, specs)
        run = self.runs.begin(job.request.msg_id, loaded.model_id, str(config.output_dir), job.request.session,
                              resume=resume_recipe(loaded, content, options, datasets),
                              continues=options.get("resume_from") is not None)

        def on_event(kind: str, event: dict[str, Any]) -> None:
            event = json_clean(event)
            self.runs.record(run, kind, event)
            job.emit(kind, event)

        try:
            if launch is not None:
                # The ranks load the model themselves; the resident copy keeps serving meanwhile.
                outcome = launch(on_event, job.cancel)
            else:
                with self.exclusive(loaded.model_id), self.without_adapters(loaded.model_id):
                    outcome = train(loaded.model, loaded.tokenizer, specs, config, on_event=on_event,
                                    cancel=job.cancel).to_dict()
        except BaseException as e:
            self.runs.end(run, "cancelled" if isinstance(e, CancelledError) else "failed", f"{type(e).__name__}: {e}")
            raise
        reply = json_clean(outcome)
        self.runs.end(run, str(reply.get("status", "completed")))
        reply["outcome"] = reply.pop("status")
        return {"status": "ok", **reply}

    def preview(self, job: JobContext) -> dict[str, Any]:
        from .engine.chat_encoding import preview

        content = job.request.content
        loaded = self.registry.get(content["model_id"])
        specs = dataset_specs(content["datasets"], self.root)
        examples = preview(specs, loaded.tokenizer, content.get("n", 3), max_length=content.get("max_length"),
                           seed=content.get("seed", 42))
        return {"status": "ok", "examples": examples}

    # ------------------------------------------------------------ adapter_load / adapter_unload / adapter_list

    def adapter_load(self, job: JobContext) -> dict[str, Any]:
        content = job.request.content
        loaded = self.registry.get(content["model_id"])
        folder = resolve_user_path(content["path"], self.root, "path").resolve()
        manager = self.manager(loaded)
        name = content.get("name")
        stamp = _stamp(folder)
        reloaded = False
        with self.exclusive(loaded.model_id):
            known = next((i for i in manager.list() if i.path == str(folder) and name in (None, i.name)), None)
            if known is not None and self._stamps.get((loaded.model_id, known.name)) != stamp:
                # The folder was written again (a new run into the same output): load what is there now.
                manager.unload(known.name)
                name, reloaded = known.name, True
            info = manager.load(folder, name, activate=False)
        with self._lock:
            self._stamps[(loaded.model_id, info.name)] = stamp
        return {"status": "ok", "adapter": _adapter_dict(info), "reloaded": reloaded,
                "adapters": [_adapter_dict(i) for i in manager.list()]}

    def adapter_unload(self, job: JobContext) -> dict[str, Any]:
        content = job.request.content
        loaded = self.registry.get(content["model_id"])
        manager = self._existing(loaded.model_id)
        unloaded = manager is not None and content["name"] in manager.names()
        if unloaded:
            with self.exclusive(loaded.model_id):
                manager.unload(content["name"])
            with self._lock:
                self._stamps.pop((loaded.model_id, content["name"]), None)
        return {"status": "ok", "unloaded": unloaded,
                "adapters": [_adapter_dict(i) for i in manager.list()] if manager else []}

    def adapter_list(self, job: JobContext) -> dict[str, Any]:
        loaded = self.registry.get(job.request.content["model_id"])
        manager = self._existing(loaded.model_id)
        return {"status": "ok", "adapters": [_adapter_dict(i) for i in manager.list()] if manager else []}
