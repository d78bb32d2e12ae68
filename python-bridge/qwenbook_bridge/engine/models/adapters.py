"""LoRA (peft) adapters on a loaded base model: load several, switch, disable, unload, without reloading the base.

peft injects adapter layers into the base model's modules in place, so whatever holds the base model object
(generation, serving) uses the active adapter without knowing about it; with no adapter active, or all of them
disabled, the output is the base model's own. Adapters are ordinary peft folders (adapter_config.json +
adapter_model.safetensors), as written by training and loadable by `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenbook_bridge.engine.errors import EngineError, InvalidOptionError

# Names the merged view gives the adapter folders it attaches, apart from any the user named.
_MERGE_PREFIX = "qwenbook_merge"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class AdapterError(EngineError):
    """An adapter folder cannot be used with this model, or a name is unknown or taken."""


@dataclass
class AdapterInfo:
    name: str
    path: str
    r: int | None
    alpha: float | None
    targets: list[str]
    base_model: str | None
    active: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The folder's adapter_config.json, with a clear error when the folder is something else."""
    p = Path(path)
    if not p.is_dir():
        raise AdapterError(f"{p}: adapter folder not found")
    cfg = p / "adapter_config.json"
    if not cfg.is_file():
        if (p / "config.json").is_file():
            raise AdapterError(f"{p} is a full model folder (config.json, no adapter_config.json): load it as a "
                               "model, not as an adapter")
        raise AdapterError(f"{p} is not a peft adapter folder (no adapter_config.json)")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not any((p / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise AdapterError(f"{p} has adapter_config.json but no adapter_model.safetensors")
    return data


class AdapterManager:
    """The adapters loaded onto one base model. At most one is active; `activate(None)` gives base output."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._peft: Any = None
        self._paths: dict[str, str] = {}
        self._configs: dict[str, dict[str, Any]] = {}
        self._active: str | None = None
        self._requires_grad: dict[str, bool] = {}

    @property
    def active(self) -> str | None:
        return self._active

    def names(self) -> list[str]:
        return list(self._paths)

    def list(self) -> list[AdapterInfo]:
        return [self._info(n) for n in self._paths]

    def load(self, path: str | Path, name: str | None = None, *, activate: bool = True) -> AdapterInfo:
        """Load the adapter folder at `path` under `name` (default: the folder's name) and, by default, make it
        active. Loading the same folder under the same name again is a no-op."""
        folder = str(Path(path).resolve())
        config = read_adapter_config(folder)
        if name is None:
            name = self._default_name(Path(folder))
        elif not isinstance(name, str) or not _NAME.match(name):
            raise InvalidOptionError(f"adapter name {name!r} must be letters, digits, '_' or '-'")
        if name in self._paths:
            if self._paths[name] != folder:
                raise AdapterError(f"an adapter named {name!r} is already loaded from {self._paths[name]}; unload it "
                                   "first or choose another name")
        else:
            self._inject(folder, name)
            self._paths[name], self._configs[name] = folder, config
        if activate:
            self.activate(name)
        elif self._active is None:
            self._peft.base_model.disable_adapter_layers()
        return self._info(name)

    def activate(self, name: str | None) -> None:
        """Make `name` the adapter in use, or with None switch adapters off (the base model's output)."""
        if name is None:
            if self._peft is not None:
                self._peft.base_model.disable_adapter_layers()
            self._active = None
            return
        self._require(name)
        self._peft.base_model.enable_adapter_layers()
        self._peft.set_adapter(name)
        self._active = name

    def unload(self, name: str) -> None:
        """Remove one adapter; removing the last one gives the base model back exactly as it was."""
        self._require(name)
        if len(self._paths) == 1:
            self.unload_all()
            return
        if self._active == name:
            # Point peft at another adapter first: deleting its active one makes it pick one itself.
            self._peft.set_adapter(next(n for n in self._paths if n != name))
        self._peft.delete_adapter(name)
        del self._paths[name], self._configs[name]
        if self._active == name:
            self.activate(None)
        elif self._active is not None:
            self._peft.set_adapter(self._active)

    def unload_all(self) -> None:
        if self._peft is not None:
            self._peft.unload()
            for n, p in self.model.named_parameters():
                p.requires_grad_(self._requires_grad.get(n, p.requires_grad))
        self._peft, self._active = None, None
        self._paths.clear()
        self._configs.clear()

    @contextmanager
    def using(self, name: str | None) -> Iterator[None]:
        """Activate `name` (None: base output) for the duration of the block, then go back."""
        previous = self._active
        self.activate(name)
        try:
            yield
        finally:
            if previous is None or previous in self._paths:
                self.activate(previous)

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Take every adapter off for the block (e.g. to train a new one on the bare base), then put them back."""
        loaded = [(n, self._paths[n]) for n in self._paths]
        active = self._active
        self.unload_all()
        try:
            yield
        finally:
            for n, path in loaded:
                self.load(path, n, activate=False)
            self.activate(active if active in self._paths else None)

    # -- internals --------------------------------------------------------------------------------------------
    def _inject(self, folder: str, name: str) -> None:
        from peft import PeftModel

        first = self._peft is None
        if first:
            self._requires_grad = {n: p.requires_grad for n, p in self.model.named_parameters()}
        try:
            if first:
                self._peft = PeftModel.from_pretrained(self.model, folder, adapter_name=name, is_trainable=False)
            else:
                self._peft.load_adapter(folder, adapter_name=name, is_trainable=False)
                if self._active is not None:
                    self._peft.set_adapter(self._active)
        except Exception as e:  # noqa: BLE001 - peft raises many types for a mismatched adapter
            self._undo_failed_inject(first, name)
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AdapterError(f"{folder} does not fit this model: {first_line[:300]}") from None
        self.model.eval()

    def _undo_failed_inject(self, first: bool, name: str) -> None:
        try:
            if first:
                if self._peft is not None:
                    self._peft.unload()
                else:
                    from peft.tuners.tuners_utils import BaseTunerLayer
                    if any(isinstance(m, BaseTunerLayer) for m in self.model.modules()):
                        self._strip_layers()
                self._peft = None
            elif name in getattr(self._peft, "peft_config", {}):
                self._peft.delete_adapter(name)
        finally:
            for n, p in self.model.named_parameters():
                p.requires_grad_(self._requires_grad.get(n, p.requires_grad))

    def _strip_layers(self) -> None:
        # A first injection that failed half way leaves tuner layers but no PeftModel to unload them with.
        from peft.tuners.tuners_utils import BaseTunerLayer
        for parent in list(self.model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, BaseTunerLayer):
                    setattr(parent, child_name, child.get_base_layer())

    def _require(self, name: str) -> None:
        if name not in self._paths:
            loaded = ", ".join(self._paths) or "none"
            raise AdapterError(f"no adapter named {name!r} is loaded (loaded: {loaded})")

    def _default_name(self, folder: Path) -> str:
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", folder.name) or "adapter"
        if folder.name.startswith("checkpoint-"):
            base = re.sub(r"[^A-Za-z0-9_-]+", "_", f"{folder.parent.name}-{folder.name}")
        name, i = base, 2
        while name in self._paths and self._paths[name] != str(folder):
            name, i = f"{base}-{i}", i + 1
        return name

    def _info(self, name: str) -> AdapterInfo:
        c = self._configs[name]
        targets = c.get("target_modules") or []
        targets = sorted(targets) if isinstance(targets, list) else [str(targets)]
        # LoRA on plain parameters (a mixture-of-experts model's expert weights) is listed by parameter name.
        targets += sorted(c.get("target_parameters") or [])
        return AdapterInfo(name=name, path=self._paths[name], r=c.get("r"), alpha=c.get("lora_alpha"),
                           targets=targets,
                           base_model=c.get("base_model_name_or_path"), active=self._active == name)


@contextmanager
def merged_view(model: Any, adapters: list[Path]) -> Iterator[Any]:
    """`model` with the adapter folders attached and all of them active (each is merged on the way out), then
    detached again: the resident model is left exactly as it was, trainability flags included."""
    if not adapters:
        yield model
        return
    from peft import PeftModel

    # model_parts imports torch; kept out of this module's imports so that checking an adapter folder
    # (read_adapter_config, e.g. `qwenbook serve --adapter` before the model loads) needs no torch.
    from qwenbook_bridge.engine.model_parts import has_lora

    if has_lora(model):
        raise InvalidOptionError("this model already has a LoRA adapter attached in the worker; save it with that "
                                 "adapter, or detach it before merging adapter folders")
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    names = [f"{_MERGE_PREFIX}{i}" for i in range(len(adapters))]
    peft_model = None
    try:
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name=names[0])
            for name, path in zip(names[1:], adapters[1:]):
                peft_model.load_adapter(str(path), adapter_name=name)
        except Exception as e:  # noqa: BLE001 - peft raises many types for an adapter made for another model
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise InvalidOptionError(f"the adapter does not fit {type(model).__name__}: {first}") from None
        # Several active adapters add up, in the forward pass and in the merged weights alike.
        peft_model.base_model.set_adapter(names)
        peft_model.eval()
        yield peft_model
    finally:
        if peft_model is not None:
            peft_model.unload()
        elif has_lora(model):
            _strip_tuner_layers(model)
        for n, p in model.named_parameters():
            p.requires_grad_(trainable.get(n, p.requires_grad))


def _strip_tuner_layers(model: Any) -> None:
    # A load that failed half way leaves LoRA layers behind with no PeftModel to unload them.
    from peft.tuners.tuners_utils import BaseTunerLayer

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(parent, child_name, child.get_base_layer())
