"""The `save` and `export` requests: a resident model written as a safetensors folder (plain, adapter-merged,
int8/int4) or as one GGUF file, with progress events, cancellation and a size/quality report.

The engine does the writing (engine/export/merge.py, engine/export/quantized.py, engine/export/gguf.py): everything goes to a hidden sibling
and is renamed into place at the end, so a cancel (checked at every progress event, i.e. between tensors) or an
error leaves nothing that looks finished. Paths must be absolute (handlers/paths.py checks them, and the --root): the
worker runs in its own folder, and the notebook API resolves relative paths against the notebook's folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenbook_bridge.engine import CancelledError, InvalidOptionError, LoadedModel, ModelRegistry
from qwenbook_bridge.engine.models.adapters import merged_view
from qwenbook_bridge.engine.files.save import ProgressEvent, SaveConfig, TargetExistsError
from qwenbook_bridge.protocol import json_clean
from qwenbook_bridge.handlers.paths import resolve_user_path, with_calibration_path

if TYPE_CHECKING:
    from qwenbook_bridge.handlers.context import JobContext

# Stages during which nothing is in place yet, so a cancel can still undo everything. Later ones ("evaluate",
# "done") come after the rename: the files are complete and the report is finished rather than thrown away.
_CANCELLABLE_STAGES = frozenset({"prepare", "quantize", "calibrate", "write", "tokenizer"})


def check_adapter_folder(path: Path) -> None:
    if not path.is_dir():
        raise InvalidOptionError(f"adapter folder {path} does not exist: pass the folder training wrote "
                                 "(it holds adapter_config.json)")
    if not (path / "adapter_config.json").is_file():
        hint = " (it is a full model folder: load it as a model instead)" if (path / "config.json").is_file() else ""
        raise InvalidOptionError(f"{path} is not a peft adapter folder: it has no adapter_config.json{hint}")


def refuse_existing(target: Path, *, is_dir: bool, overwrite: bool) -> None:
    """The engine refuses these too; this says it in the notebook API's words, before any work starts."""
    if not target.exists():
        return
    if is_dir and not target.is_dir():
        raise TargetExistsError(f"{target} is a file, but save() writes a folder there: remove it or choose another "
                                "path")
    if not is_dir and target.is_dir():
        raise TargetExistsError(f"{target} is a folder, but export() writes one file: give a file name like "
                                "model.gguf")
    if overwrite or (is_dir and not any(target.iterdir())):
        return
    what = "folder exists and is not empty" if is_dir else "file already exists"
    raise TargetExistsError(f"{target}: the {what}. Nothing was written; pass {{ overwrite: true }} to replace it, "
                            "or choose another path.")


def report_content(report: Any) -> dict[str, Any]:
    content = json_clean(report.to_dict())
    content["sizes"]["files"] = [{"path": f["path"], "bytes": f["bytes"]} for f in content["sizes"]["files"]]
    return {"status": "ok", **content}


class ExportHandlers:
    def __init__(self, registry: ModelRegistry, root: Path | None = None) -> None:
        self.registry = registry
        self.root = root  # client paths must resolve inside it (handlers/paths.py); None: anywhere

    def jobs(self) -> dict[str, Callable[[JobContext], dict[str, Any]]]:
        return {"save": self.save, "export": self.export}

    # ------------------------------------------------------------ requests

    def save(self, job: JobContext) -> dict[str, Any]:
        from qwenbook_bridge.engine.export.merge import save_model
        from qwenbook_bridge.engine.quant.quantize import quantized_layers
        from qwenbook_bridge.engine.quant.at_load import quant_config

        content = job.request.content
        loaded, target, adapters = self._common(job, is_dir=True)
        resident = loaded.info.get("quant") or {}
        spec = with_calibration_path(content.get("quant"), self.root)
        if spec is not None and "group_size" not in spec and resident.get("group_size"):
            spec = {**spec, "group_size": resident["group_size"]}  # "int4" alone keeps the resident's groups
        if spec is not None and spec.get("method") == "nf4":
            raise InvalidOptionError("nf4 (bitsandbytes) weights cannot be saved by Qwenbook: save int8 or int4")
        quant = quant_config(spec, "save quant")
        config = SaveConfig(shard_size=content.get("shard_size", "2GB"), dtype=content.get("dtype"),
                            overwrite=bool(content.get("overwrite", False)))
        try:
            config.validate()
        except ValueError as e:
            raise InvalidOptionError(str(e)) from None
        progress = self._progress(job, target)
        in_memory = bool(quantized_layers(loaded.model))
        if quant is None and not in_memory:
            with merged_view(loaded.model, adapters) as model:
                report = save_model(model, loaded.tokenizer, target, config, progress=progress,
                                    require_adapter=bool(adapters))
        else:
            from qwenbook_bridge.engine.export.resident import save_resident_quantized

            report = save_resident_quantized(loaded, target, config, quant, adapters, progress)
        if adapters:
            report.details["adapters"] = [str(a) for a in adapters]
        return report_content(report)

    def export(self, job: JobContext) -> dict[str, Any]:
        from qwenbook_bridge.engine.export.gguf import GgufConfig, export_gguf

        content = job.request.content
        loaded, target, adapters = self._common(job, is_dir=False)
        config = GgufConfig(type=content.get("type", "f16"), overwrite=bool(content.get("overwrite", False)),
                            name=Path(loaded.path).name, modelfile=bool(content.get("modelfile", True)))
        try:
            config.validate()
        except ValueError as e:
            raise InvalidOptionError(str(e)) from None
        with merged_view(loaded.model, adapters) as model:
            report = export_gguf(model, loaded.tokenizer, target, config, progress=self._progress(job, target))
        if adapters:
            report.details["adapters"] = [str(a) for a in adapters]
        if loaded.info.get("quant"):
            report.details["dequantized"] = True  # int8/int4 codes written as floating point (then `type`)
        return report_content(report)

    # ------------------------------------------------------------ helpers

    def _common(self, job: JobContext, *, is_dir: bool) -> tuple[LoadedModel, Path, list[Path]]:
        content = job.request.content
        what = "save" if is_dir else "export"
        if job.cancel.is_set():
            raise CancelledError(f"the {what} was cancelled before it started; nothing was written")
        loaded = self.registry.get(content["model_id"])
        if (loaded.info.get("quant") or {}).get("method") == "nf4":
            raise InvalidOptionError(f"{loaded.model_id} holds nf4 (bitsandbytes) weights, which Qwenbook cannot "
                                     f"{what}: load the unquantized model and {what} that instead (save can make int8 or int4)")
        target = resolve_user_path(content["target"], self.root, f"{what} target")
        adapters = [resolve_user_path(a, self.root, f"adapters[{i}]")
                    for i, a in enumerate(content.get("adapters") or [])]
        for a in adapters:
            check_adapter_folder(a)
        refuse_existing(target, is_dir=is_dir, overwrite=bool(content.get("overwrite", False)))
        return loaded, target, adapters

    def _progress(self, job: JobContext, target: Path) -> Callable[[ProgressEvent], None]:
        def on_progress(event: ProgressEvent) -> None:
            if job.cancel.is_set() and event.stage in _CANCELLABLE_STAGES:
                raise CancelledError(f"writing {target} was cancelled ({event.stage} stage); nothing was written")
            job.emit("export_progress", {**event.to_dict(), "fraction": min(1.0, max(0.0, event.fraction))})
        return on_progress
