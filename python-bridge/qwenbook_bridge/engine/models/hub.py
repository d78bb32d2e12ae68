"""Where a model's files are: a local folder as given, or a Hugging Face hub id resolved through the cache.

The hub is asked only when the cache cannot answer, and then with short timeouts: a notebook on a machine
without network must get a clear error in seconds, not a hang.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from qwenbook_bridge.engine.errors import CancelledError, ModelNotFoundError

# Files a causal LM needs; skipping the rest keeps repos that also ship GGUF, ONNX or original checkpoints lean.
_IGNORE = ["*.gguf", "*.onnx", "*.onnx_data", "*.pth", "*.pt", "*.h5", "*.msgpack", "*.ot", "*.tflite",
           "original/*", "onnx/*", "*.mlmodel", "coreml/*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# The first contact with the hub decides whether there is a network at all: keep it short so an offline
# notebook gets its error in seconds. File transfers themselves have no such limit.
_PROBE_TIMEOUT_S = 5.0
_ETAG_TIMEOUT_S = 10.0

# (bytes_done, bytes_total or None)
DownloadProgress = Callable[[int, int | None], None]


def looks_like_path(source: str) -> bool:
    """True for things a user means as a folder: absolute, ~, ./, ../, Windows-style or several path parts."""
    if source.startswith(("/", "~", "./", "../", ".\\", "..\\")) or "\\" in source or source in (".", ".."):
        return True
    return source.count("/") > 1 or source.endswith("/") or os.path.exists(source)


def is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source))


def weights_problem(folder: Path) -> str | None:
    """Why `folder` cannot provide weights, or None when it can (sharded checkpoints need every shard)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError) as e:
                return f"{index} is unreadable ({e})"
            missing = sorted(s for s in shards if not (folder / s).is_file())
            if missing:
                return f"{len(missing)} of {len(shards)} weight shards are missing (first: {missing[0]})"
            return None
    if any(folder.glob("*.safetensors")) or (folder / "pytorch_model.bin").is_file():
        return None
    return "it has no weights (*.safetensors or pytorch_model.bin)"


def _offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _cache_dir() -> str:
    from huggingface_hub import constants
    return str(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder for `repo_id`, if the cache holds a complete one."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    if not (path / "config.json").is_file() or weights_problem(path) is not None:
        return None
    return path


def _progress_bar_class(report: DownloadProgress) -> type:
    """A silent tqdm that forwards snapshot_download's byte counts to `report` (at most ~4 times a second).

    snapshot_download feeds two byte bars: network transfer (whose total it inflates, as compression makes it
    unknowable) and bytes written, whose total is the sum of file sizes. The written-bytes bar is the honest
    one; the transfer bar is used only if a hub version has no other.
    """
    lock = threading.Lock()
    byte_bars: list[Any] = []
    last = [0.0]

    class _Bar(tqdm):  # type: ignore[misc]
        def __init__(self, *args, **kwargs):
            counts_bytes = kwargs.get("unit") == "B"
            self._transfer = str(kwargs.get("desc") or "").startswith("Downloading bytes")
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            if counts_bytes:
                with lock:
                    byte_bars.append(self)

        def update(self, n=1):
            self.n += n or 0  # a disabled tqdm does not count; the hub reads .n back
            if not n or self not in byte_bars:
                return None
            with lock:
                now = time.monotonic()
                if now - last[0] < 0.25:
                    return None
                last[0] = now
                honest = [b for b in byte_bars if not b._transfer] or byte_bars
                bar = max(honest, key=lambda b: b.n)
                done, total = int(bar.n), int(bar.total) if bar.total else None
            report(done, total)
            return None

    return _Bar


def download_snapshot(repo_id: str, revision: str | None, progress: DownloadProgress | None) -> Path:
    """Download `repo_id` into the Hugging Face cache, failing fast with a fixable message when it cannot."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    fix = "pass a local folder or set QWENBOOK_MODEL"
    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=_PROBE_TIMEOUT_S)
        files = [s.rfilename for s in (info.siblings or [])]
        ignore = list(_IGNORE)
        if any(f.endswith(".safetensors") for f in files):
            ignore.append("*.bin")  # the same weights twice; safetensors loads faster and safer
        path = snapshot_download(repo_id, revision=info.sha, ignore_patterns=ignore, etag_timeout=_ETAG_TIMEOUT_S,
                                 tqdm_class=_progress_bar_class(progress) if progress else None)
    except GatedRepoError as e:
        raise ModelNotFoundError(
            f"{where} is gated on the Hugging Face hub: accept its licence on huggingface.co and log in "
            f"(`hf auth login`), or {fix} ({type(e).__name__})") from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"{where} does not exist on the Hugging Face hub (or is private): check the spelling, e.g. "
            f"'Qwen/Qwen2.5-7B-Instruct', or {fix}") from e
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(f"{where}: that revision does not exist on the hub; drop it or {fix}") from e
    except CancelledError:
        raise
    except Exception as e:  # network errors come from several libraries (httpx, OSError, hub wrappers)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"{where} is not in the local Hugging Face cache ({_cache_dir()}) and could not be downloaded "
            f"({type(e).__name__}: {reason}); {fix}") from e
    return Path(path)


def resolve_hub_model(repo_id: str, revision: str | None, local_files_only: bool,
                      progress: DownloadProgress | None = None) -> tuple[Path, bool]:
    """Local folder for a hub id, and whether it had to be downloaded."""
    cached = cached_snapshot(repo_id, revision)
    if cached is not None:
        return cached, False
    if local_files_only or _offline():
        why = "local_files_only was set" if local_files_only else "HF_HUB_OFFLINE is set"
        raise ModelNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache ({_cache_dir()}) and downloads are off ({why}); "
            "pass a local folder or set QWENBOOK_MODEL")
    return download_snapshot(repo_id, revision, progress), True
