"""Every file path a client sends goes through here before the worker reads or writes it.

Paths arrive absolute (the notebook API resolves them against the notebook's folder) or starting with `~`.
A worker shared by several users can be given a root (`--root DIR` or $QWENBOOK_ROOT): then a path must lie
inside it once `~` is expanded and symlinks are followed, so that one user cannot make the worker read or
write another's files through it. The check follows the links that exist when the request arrives.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qwenbook_bridge.engine import InvalidOptionError

ROOT_ENV = "QWENBOOK_ROOT"


class PathOutsideRootError(InvalidOptionError):
    """A client-given path that resolves outside the worker's --root."""


def worker_root(value: str | os.PathLike[str] | None = None) -> Path | None:
    """The root from --root, else $QWENBOOK_ROOT, else None (no restriction); it must be an existing folder."""
    raw = os.fspath(value) if value is not None else os.environ.get(ROOT_ENV, "")
    if not raw:
        return None
    root = Path(raw).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"the worker root {raw!r} ({root}) is not an existing folder: create it or pass another "
                         f"--root / {ROOT_ENV}")
    return root


def resolve_user_path(path: str, root: Path | None, purpose: str) -> Path:
    """`path` with `~` expanded, after checking it is absolute and (with a root) resolves inside the root.

    Returns the expanded path, not the resolved one, so that reports show the folder the user named; the
    check itself uses the resolved path. `purpose` names the field in errors (e.g. "config.output_dir").
    """
    expanded = Path(path).expanduser()
    if not expanded.is_absolute():
        raise InvalidOptionError(
            f"{purpose} must be an absolute path, got {path!r}: the worker runs in its own folder, so a relative "
            "path would land somewhere unexpected (the notebook API resolves paths against the notebook's folder)")
    if root is not None:
        resolved = expanded.resolve()
        if not resolved.is_relative_to(root):
            shown = f"{path!r}" if str(resolved) == path else f"{path!r} (which resolves to {resolved})"
            raise PathOutsideRootError(
                f"{purpose} {shown} is outside this worker's root {root}: the worker only reads and writes under "
                f"its root (--root / {ROOT_ENV}); use a path inside it")
    return expanded


def with_calibration_path(quant: dict[str, Any] | None, root: Path | None) -> dict[str, Any] | None:
    """A request's `quant` options with its calibration file (if any) checked like every other path."""
    if quant is None or quant.get("calibration") is None:
        return quant
    return {**quant, "calibration": str(resolve_user_path(quant["calibration"], root, "quant.calibration"))}


def model_source(source: str, root: Path | None) -> str:
    """A load request's `model`: a local folder is checked like any path; a hub id (org/name) is left alone,
    since what it names is downloaded into the worker's own cache, not somewhere the client chose."""
    from qwenbook_bridge.engine.models.hub import looks_like_path

    if root is None or not looks_like_path(source):
        return source
    if not Path(source).expanduser().is_absolute():
        source = str(Path(source).absolute())  # a relative folder the worker would find from its own cwd
    return str(resolve_user_path(source, root, "model"))
