"""Loading causal language models (hub id or local folder) and keeping them resident.

A worker loads a model once; a second `load` of the same weights, dtype and device returns the resident copy,
so notebooks that restart their kernel re-attach instantly.
"""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwenbook_bridge.engine.models.device_map import Placement, devices_used, first_device, resolve_placement
from qwenbook_bridge.engine.errors import (DeviceUnavailableError, InvalidOptionError, ModelNotFoundError, ModelNotLoadedError,
    NotACausalLMError)
from qwenbook_bridge.engine.models.devices import configure_cuda, resolve_device
from qwenbook_bridge.engine.models.hub import is_hub_id, looks_like_path, resolve_hub_model, weights_problem
from qwenbook_bridge.engine.models.tokenizers import load_tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
ATTENTION = ("sdpa", "eager")


@dataclass
class LoadOptions:
    dtype: str = "auto"  # auto: bf16 on GPUs that support it (fp16 otherwise), fp32 on CPU where bf16 is slow
    device: str = "auto"  # auto: the worker's default device (its --device), else cuda:0 when present
    revision: str | None = None  # hub branch, tag or commit; ignored for local folders
    attn_implementation: str = "sdpa"  # PyTorch's fused attention: fastest portable choice
    local_files_only: bool = False  # never touch the network, even when the cache misses
    # {method: int8 | int4 | nf4, group_size, calibration}: weight-only quantization while loading (engine/quant/at_load.py)
    quant: dict[str, Any] | None = None
    # "auto" | ["cuda:0", "cuda:1"] | {"maxMemory": {...}}: spread layers over several devices (device_map.py)
    devices: Any = None


@dataclass
class LoadProgress:
    stage: str  # resolve | download | tokenizer | weights | quantize | cpu_chat | ready
    message: str
    fraction: float | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


ProgressCallback = Callable[[LoadProgress], None]


@dataclass
class LoadedModel:
    model_id: str
    source: str
    path: Path
    model: Any
    tokenizer: Any
    info: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)


@dataclass(frozen=True)
class _Plan:
    source: str
    label: str
    path: Path
    device: torch.device
    dtype_name: str
    attn_implementation: str
    quant: Any = field(default=None, compare=False)  # QuantConfig to apply after loading, or None
    quant_key: str = ""
    stored_quant: str | None = None  # the method of a folder saved quantized
    placement: Placement | None = None  # several devices through a device map, or None for `device` alone

    @property
    def where(self) -> str:
        return self.placement.key if self.placement is not None else str(self.device)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (str(self.path), self.dtype_name, self.where, self.quant_key)

    def model_id(self, label: str) -> str:
        method = self.stored_quant or (self.quant.method if self.quant is not None else None)
        return f"{label}:{self.dtype_name}:{self.where}" + (f":{method}" if method else "")


def resolve_dtype(name: str, device: torch.device) -> str:
    key = (name or "auto").strip().lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if key not in DTYPES:
        raise InvalidOptionError(f"dtype {name!r} is not supported: use 'auto', 'bf16', 'fp16' or 'fp32'")
    if key == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceUnavailableError(f"{device} does not support bf16: use dtype 'fp16' or 'auto'")
    return key


def _is_causal_architecture(arch: str, model_type: str | None) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    if arch.endswith("ForCausalLM") or arch in set(causal.values()):
        return True
    # Multimodal checkpoints (e.g. *ForConditionalGeneration) whose text model AutoModelForCausalLM can load.
    return arch.endswith("ForConditionalGeneration") and model_type in causal


def check_model_folder(path: Path) -> dict[str, Any]:
    """Raise a fixable error unless `path` is a loadable causal-LM folder; return its config.json."""
    if not path.exists():
        raise ModelNotFoundError(
            f"model folder {path} does not exist: pass an existing folder, a hub id like 'Qwen/Qwen2.5-7B-Instruct', "
            "or set QWENBOOK_MODEL")
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is a file, not a model folder: pass the folder that holds config.json")
    config_file = path / "config.json"
    if not config_file.is_file():
        found = sorted(p.name for p in path.iterdir())
        shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "") if found else "nothing"
        raise NotACausalLMError(
            f"{path} has no config.json, so it is not a Hugging Face model folder (it holds {shown}); "
            "pass the folder that contains config.json and the weights")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise NotACausalLMError(f"{config_file} is not valid JSON ({e}); re-download or re-save the model") from e
    model_type = config.get("model_type")
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        import transformers
        raise NotACausalLMError(
            f"{path} holds a model of type {model_type!r}, which transformers {transformers.__version__} does not "
            "know: upgrade transformers or use a supported causal LM such as Qwen/Qwen2.5-7B-Instruct")
    causal = any(_is_causal_architecture(a, model_type) for a in archs) if archs else \
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not causal:
        what = ", ".join(archs) if archs else "no causal-LM head"
        raise NotACausalLMError(
            f"{path} holds a {model_type} model ({what}), not a causal language model; Qwenbook needs a "
            "*ForCausalLM checkpoint such as Qwen/Qwen2.5-7B-Instruct")
    problem = weights_problem(path)
    if problem:
        raise ModelNotFoundError(f"{path} cannot be loaded: {problem}; re-download or re-save the model")
    return config


def _resolve_path(source: str, options: LoadOptions, progress: ProgressCallback) -> tuple[Path, str]:
    """Folder and display label for `source`."""
    local = Path(source).expanduser()
    if local.exists() or looks_like_path(source):
        return local.resolve(), local.resolve().name
    if not is_hub_id(source):
        raise ModelNotFoundError(
            f"{source!r} is neither an existing folder nor a hub id of the form 'org/name' "
            "(e.g. 'Qwen/Qwen2.5-7B-Instruct'); pass a local folder or set QWENBOOK_MODEL")
    progress(LoadProgress("resolve", f"looking for {source} in the Hugging Face cache"))

    def on_bytes(done: int, total: int | None) -> None:
        fraction = min(1.0, done / total) if total else None
        progress(LoadProgress("download", f"downloading {source}", fraction, done, total))

    path, downloaded = resolve_hub_model(source, options.revision, options.local_files_only, on_bytes)
    if downloaded:
        progress(LoadProgress("download", f"downloaded {source}", 1.0))
    return path, source


def plan_load(source: str, options: LoadOptions, progress: ProgressCallback, default_device: str = "auto") -> _Plan:
    if not isinstance(source, str) or not source.strip():
        raise InvalidOptionError("model must be a hub id like 'Qwen/Qwen2.5-7B-Instruct' or a folder, got nothing")
    if options.attn_implementation not in ATTENTION:
        raise InvalidOptionError(
            f"attn_implementation {options.attn_implementation!r} is not supported: use 'sdpa' or 'eager'")
    placement = resolve_placement(options.devices)
    if placement is not None and (options.device or "auto").strip().lower() != "auto":
        raise InvalidOptionError(
            f"pass either device ({options.device!r}) or devices ({options.devices!r}), not both: "
            "devices spreads the model over several devices, device puts it on one")
    device = placement.primary if placement is not None else resolve_device(options.device, default_device)
    if placement is not None and not placement.spread:
        placement = None  # nothing to spread over (no GPU): an ordinary single-device load
    dtype_name = resolve_dtype(options.dtype, device)
    from qwenbook_bridge.engine.quant.at_load import check_folder_quant, quant_config, quant_key

    quant = quant_config(options.quant)  # before any download or weight is read
    path, label = _resolve_path(source.strip(), options, progress)
    check_model_folder(path)
    stored = check_folder_quant(path, quant)
    if stored is not None:
        quant = None  # the folder's own codes are used as they are
    if placement is not None and (quant is not None or stored is not None):
        raise InvalidOptionError(
            "devices cannot be combined with Qwenbook's weight-only quantization yet: load the quantized model on "
            "one device (device 'cuda:N'), or load it unquantized with devices")
    return _Plan(source, label, path, device, dtype_name, options.attn_implementation, quant, quant_key(quant), stored,
                 placement)


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends a reply: the generation config's end token(s) and the tokenizer's."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def _load_planned(plan: _Plan, model_id: str, progress: ProgressCallback) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    from qwenbook_bridge.engine.quant.at_load import load_quantized_folder, quantize_loaded

    started = time.perf_counter()
    if plan.device.type == "cuda":
        configure_cuda()
    if plan.stored_quant is not None:
        progress(LoadProgress("weights", f"loading {plan.stored_quant} weights as saved onto {plan.device}"))
        model, tokenizer, quant_info = load_quantized_folder(plan.path, plan.device, plan.dtype_name)
        attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
        return _finish_load(plan, model_id, model, tokenizer, attn, started, quant_info, progress)
    progress(LoadProgress("tokenizer", f"loading the tokenizer from {plan.path}"))
    tokenizer = load_tokenizer(plan.path)
    progress(LoadProgress("weights", f"loading weights as {plan.dtype_name} onto {plan.device}"))
    kwargs: dict[str, Any] = {"dtype": DTYPES[plan.dtype_name]}
    if plan.placement is not None:
        kwargs["device_map"] = plan.placement.device_map
        kwargs["max_memory"] = dict(plan.placement.max_memory or {})
    elif plan.device.type == "cuda":
        kwargs["device_map"] = {"": plan.device.index}  # straight onto the GPU, without a full copy in RAM
    attn = plan.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(plan.path, attn_implementation=attn, **kwargs)
    except ValueError as e:
        if attn != "sdpa" or "sdpa" not in str(e).lower():
            raise
        progress(LoadProgress("weights", "this architecture has no sdpa attention; using eager attention"))
        attn = "eager"
        model = AutoModelForCausalLM.from_pretrained(plan.path, attn_implementation=attn, **kwargs)
    if plan.device.type != "cuda" and plan.placement is None:
        model.to(plan.device)
    model.eval()
    quant_info = None
    if plan.quant is not None:
        def on_quant(message: str, fraction: float | None) -> None:
            progress(LoadProgress("quantize", message, fraction))

        quant_info = quantize_loaded(model, tokenizer, plan.quant, on_quant)
        free_memory()
    return _finish_load(plan, model_id, model, tokenizer, attn, started, quant_info, progress)


def _finish_load(plan: _Plan, model_id: str, model: Any, tokenizer: Any, attn: str, started: float,
                 quant_info: dict[str, Any] | None, progress: ProgressCallback) -> LoadedModel:
    from qwenbook_bridge.engine.quant.at_load import parameter_count

    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = getattr(text_config, "max_position_embeddings", None) or 0
    info = {
        "model_id": model_id,
        "source": plan.source,
        "path": str(plan.path),
        "architecture": type(model).__name__,
        "parameters": parameter_count(model),
        "dtype": plan.dtype_name,
        "device": str(plan.device),
        "devices": devices_used(model, plan.device),
        "context_length": int(context),
        "vocab_size": int(getattr(text_config, "vocab_size", 0) or len(tokenizer)),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "attn_implementation": attn,
        "load_seconds": round(time.perf_counter() - started, 3),
    }
    if quant_info is not None:
        info["quant"] = quant_info
    held = f", {quant_info['method']} weights" if quant_info is not None else ""
    progress(LoadProgress("ready", f"{plan.label} is ready ({info['parameters']:,} parameters, "
                                   f"{plan.dtype_name} on {'+'.join(info['devices'])}{held})", 1.0))
    device = first_device(model, plan.device) if plan.placement is not None else plan.device
    info["device"] = str(device)
    return LoadedModel(model_id, plan.source, plan.path, model, tokenizer, info, device,
                       DTYPES[plan.dtype_name], eos_token_ids(model, tokenizer))


def _no_progress(_: LoadProgress) -> None:
    pass


def load_model(source: str, options: LoadOptions | None = None, progress: ProgressCallback | None = None,
               default_device: str = "auto") -> LoadedModel:
    """Load `source` (hub id or folder) without a registry; the handle is '<name>:<dtype>:<device>[:<quant>]'."""
    progress = progress or _no_progress
    plan = plan_load(source, options or LoadOptions(), progress, default_device)
    return _load_planned(plan, plan.model_id(plan.label), progress)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class ModelRegistry:
    """Resident models, keyed by (folder, dtype, device); safe to read from one thread while another loads."""

    def __init__(self, default_device: str = "auto") -> None:
        self.default_device = default_device
        self._lock = threading.Lock()
        self._by_key: dict[tuple[str, str, str, str], LoadedModel] = {}
        # model_id -> the client sessions that loaded it: one notebook's unload must not take a model from
        # another notebook still using it (handlers/dispatch.py decides which of these sessions are still alive).
        self._users: dict[str, set[str]] = {}

    def load(self, source: str, options: LoadOptions | None = None,
             progress: ProgressCallback | None = None, user: str | None = None) -> tuple[LoadedModel, bool]:
        """The model for `source`, and whether it was already loaded; `user` (a session) is counted as using it."""
        progress = progress or _no_progress
        plan = plan_load(source, options or LoadOptions(), progress, self.default_device)
        with self._lock:
            existing = self._by_key.get(plan.key)
            taken = {m.model_id for m in self._by_key.values()}
            if existing is not None and user is not None:
                self._users.setdefault(existing.model_id, set()).add(user)
        if existing is not None:
            progress(LoadProgress("ready", f"{existing.model_id} is already loaded", 1.0))
            return existing, True
        model_id = plan.model_id(plan.label)
        n = 2
        while model_id in taken:  # same folder name in two places: keep handles unique and readable
            model_id, n = plan.model_id(f"{plan.label}~{n}"), n + 1
        loaded = _load_planned(plan, model_id, progress)
        with self._lock:
            self._by_key[plan.key] = loaded
            if user is not None:
                self._users.setdefault(model_id, set()).add(user)
        return loaded, False

    def users(self, model_id: str) -> set[str]:
        """The sessions that loaded `model_id` and have not unloaded it (empty when it is not loaded)."""
        with self._lock:
            return set(self._users.get(model_id, ()))

    def attach(self, model_id: str, user: str) -> None:
        """`user` uses `model_id` without having loaded it (an adapter put on it); ignored when it is not loaded."""
        with self._lock:
            if any(m.model_id == model_id for m in self._by_key.values()):
                self._users.setdefault(model_id, set()).add(user)

    def detach(self, model_id: str, user: str) -> None:
        """`user` no longer uses `model_id`; the model stays loaded."""
        with self._lock:
            self._users.get(model_id, set()).discard(user)

    def get(self, model_id: str) -> LoadedModel:
        with self._lock:
            for loaded in self._by_key.values():
                if loaded.model_id == model_id:
                    return loaded
            names = ", ".join(repr(m.model_id) for m in self._by_key.values()) or "none"
        raise ModelNotLoadedError(f"model {model_id!r} is not loaded in this worker (loaded: {names}); load it first")

    def unload(self, model_id: str) -> bool:
        """Drop a model and give its memory back; False if it was not loaded."""
        with self._lock:
            key = next((k for k, m in self._by_key.items() if m.model_id == model_id), None)
            loaded = self._by_key.pop(key) if key is not None else None
            self._users.pop(model_id, None)
        if loaded is None:
            return False
        loaded.model = None
        del loaded
        free_memory()
        return True

    def infos(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(m.info) for m in self._by_key.values()]
