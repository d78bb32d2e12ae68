"""Fine-tuning requests (`train`, `train_preview`) and the run list (`runs`, `run_watch`).

`train` runs on a thread of its own (the server starts one for each request type in BACKGROUND), so a long run
blocks neither control requests nor work on other models; requests for the model being trained wait for it
(the server defers them). The engine gives the caller's model back unchanged, so the base model keeps serving
once the run ends, however it ends (completed, cancelled, out of memory).

A run trains the bare base: the model's loaded adapters (engine/models/adapter_registry.py) are taken off for
it. Paths must be absolute: the notebook API resolves them against the notebook's folder.

Every run is recorded in a `RunRegistry` (handlers/run_registry.py): `runs` lists them and `run_watch` replays a run's
events and follows it, so a kernel restarted mid-run can redraw its dashboard.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenbook_bridge.distributed.requests import distributed_launcher
from qwenbook_bridge.engine import CancelledError, EngineError, InvalidOptionError, LoadedModel, ModelRegistry
from qwenbook_bridge.engine.models.adapter_registry import AdapterRegistry
from qwenbook_bridge.handlers.context import Exclusive, no_exclusive
from qwenbook_bridge.handlers.paths import resolve_user_path
from qwenbook_bridge.protocol import json_clean
from qwenbook_bridge.handlers.run_registry import RunRegistry

if TYPE_CHECKING:
    from qwenbook_bridge.engine.data.datasets import DatasetSpec
    from qwenbook_bridge.handlers.context import JobContext

# Requests the server runs on their own thread rather than the shared job thread (a watch lasts as long as its run).
BACKGROUND = frozenset({"train", "run_watch"})


class UnknownRunError(EngineError):
    """run_watch named a run this worker does not know (another worker's, or one long forgotten)."""


def resolved_datasets(items: list[dict[str, Any]], root: Path | None = None) -> list[dict[str, Any]]:
    """The request's datasets with their paths made absolute and checked (as the ranks of a run also read them)."""
    return [{**item, "path": str(resolve_user_path(item["path"], root, f"datasets[{i}].path"))}
            if item.get("path") is not None else dict(item) for i, item in enumerate(items)]


def dataset_specs(items: list[dict[str, Any]], root: Path | None = None) -> list[DatasetSpec]:
    from qwenbook_bridge.engine.data.datasets import DatasetSpec

    return [DatasetSpec.from_dict(item) for item in resolved_datasets(items, root)]


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
    def __init__(self, registry: ModelRegistry, adapters: AdapterRegistry, exclusive: Exclusive = no_exclusive,
                 root: Path | None = None) -> None:
        self.registry = registry
        self.root = root  # client paths must resolve inside it (handlers/paths.py); None: anywhere
        # Holds a served model's HTTP batch scheduler parked while a job changes the model (LoRA layers in it).
        self.exclusive = exclusive
        self.adapters = adapters
        self.runs = RunRegistry()  # what a restarted kernel lists and re-attaches to

    def jobs(self) -> dict[str, Callable[[JobContext], dict[str, Any]]]:
        return {"train": self.train, "train_preview": self.preview, "run_watch": self.watch}

    def controls(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        return {"runs": lambda _content: {"status": "ok", "runs": self.runs.list()}}

    def watch(self, job: JobContext) -> dict[str, Any]:
        try:
            run = self.runs.watch(job.request.content["run_id"], job.emit, job.cancel)
        except KeyError as e:
            raise UnknownRunError(e.args[0]) from None
        return {"status": "ok", "run": run}

    # ------------------------------------------------------------ train / train_preview

    def train(self, job: JobContext) -> dict[str, Any]:
        from qwenbook_bridge.engine.data.datasets import DatasetSpec
        from qwenbook_bridge.engine.train.loop import train
        from qwenbook_bridge.engine.train.config import TrainConfig
        from qwenbook_bridge.engine.train.reporting import require_packages

        content = job.request.content
        loaded = self.registry.get(content["model_id"])
        options = dict(content["config"])
        for name in ("output_dir", "resume_from", "init_adapter"):
            if options.get(name) is not None:
                options[name] = str(resolve_user_path(options[name], self.root, f"config.{name}"))
        config = TrainConfig.from_dict(options)
        config.validate()
        require_packages(config.report)  # here too: a several-rank run would fail only once its ranks start
        datasets = resolved_datasets(content["datasets"], self.root)
        specs = [DatasetSpec.from_dict(d) for d in datasets]
        if job.cancel.is_set():
            raise CancelledError("the training run was cancelled before it started; nothing was written")

        distributed = content.get("distributed")
        if distributed is not None and config.preference is not None:
            raise InvalidOptionError("preference tuning runs on one device for now; leave devices()/strategy()/"
                                     "cluster() out of a preference run")
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
                with self.exclusive(loaded.model_id), self.adapters.without_adapters(loaded.model_id):
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
        from qwenbook_bridge.engine.data.chat_encoding import preview

        content = job.request.content
        loaded = self.registry.get(content["model_id"])
        specs = dataset_specs(content["datasets"], self.root)
        if content.get("preference"):
            from qwenbook_bridge.engine.data.preference_data import preview_pairs

            pairs = preview_pairs(specs, loaded.tokenizer, content.get("n", 3), max_length=content.get("max_length"))
            return {"status": "ok", "examples": [], "pairs": pairs}
        examples = preview(specs, loaded.tokenizer, content.get("n", 3), max_length=content.get("max_length"),
                           seed=content.get("seed", 42))
        return {"status": "ok", "examples": examples}
