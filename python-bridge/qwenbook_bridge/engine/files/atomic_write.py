"""Writing a file or folder so that its name only ever shows a complete result.

Every writer of model files (checkpoints, merged safetensors, quantized folders, GGUF files) goes through
`AtomicTarget`: the output is written under a hidden sibling on the same filesystem,
`.<name>.partial-<pid>-<random>`, fsync'd, and renamed into place only once complete. A target that already exists
is kept until the new one is complete: a file is replaced with one `os.replace`; a folder is moved aside to
`.<name>.old-<pid>-<random>`, the new one renamed in, and the old one deleted.

A writer that is killed leaves its hidden siblings behind. No loader picks them up (they are dot names that no
loader asks for, and checkpoint listings match `checkpoint-<step>` only), and the next write to the same target
removes them, once the process named in them is gone. If the kill came between the two renames of a folder
replacement, that next write first puts the moved-aside old folder back.

Running out of space in the middle (ENOSPC, EDQUOT) removes the partial output and raises
`InsufficientDiskSpaceError`, whose message names the target, roughly what the write needed and what is free.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from qwenbook_bridge.engine.errors import InsufficientDiskSpaceError

PARTIAL = ".partial-"
OLD = ".old-"
# How a disk-full failure reads once a library (safetensors' Rust writer, torch's C++ one) has wrapped the
# OSError into its own exception type.
_DISK_FULL_WORDS = ("no space left on device", "disk quota exceeded", "storagefull", "os error 28")


class TargetExistsError(FileExistsError):
    """The output path exists and holds something; nothing was written."""


def format_bytes(n: int) -> str:
    for unit, div in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _existing_ancestor(path: Path) -> Path:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return probe


def _mount_point(path: Path) -> Path:
    probe = _existing_ancestor(path).resolve()
    while not os.path.ismount(probe) and probe.parent != probe:
        probe = probe.parent
    return probe


def check_free_space(target: Path, needed: int) -> None:
    """Raise `InsufficientDiskSpaceError` unless `needed` bytes (plus a small margin) fit where `target` goes."""
    probe = _existing_ancestor(target.resolve().parent)
    free = shutil.disk_usage(probe).free
    # Keep a margin so the write does not fill the disk to the last byte (logs, the worker's own files).
    margin = max(64 * 2**20, needed // 100)
    if needed + margin > free:
        raise InsufficientDiskSpaceError(
            f"not enough disk space for {target}: it needs about {format_bytes(needed + margin)} "
            f"({format_bytes(needed)} of data plus a safety margin) but only {format_bytes(free)} is free on the disk "
            f"holding {probe}. Free some space or choose a target on another disk.")


def is_disk_full(e: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, also when a library re-raised it as its own exception type."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(w in str(cur).lower() for w in _DISK_FULL_WORDS):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (a file's own size for a file); 0 if it is gone."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def disk_full_error(target: Path, needed: int, is_dir: bool) -> InsufficientDiskSpaceError:
    mount = _mount_point(target.parent)
    free = shutil.disk_usage(mount).free
    where = "folder" if is_dir else "path"
    return InsufficientDiskSpaceError(
        f"No space left writing {target} (needs ~{format_bytes(needed)}, {format_bytes(free)} free on {mount}): "
        f"free space or choose another {where}. Nothing was written there; what was there before is unchanged.")


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush every file and folder under `path` to disk, so the rename never publishes data still in page cache."""
    if not path.is_dir():
        _fsync_path(path)
        return
    for dirpath, _, files in os.walk(path):
        for f in files:
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # a write still going on in this process (another job to the same name)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temporaries(target: Path) -> list[Path]:
    """The hidden siblings that writes to `target` make (in progress, or left by a killed writer)."""
    if not target.parent.is_dir():
        return []
    stem = f".{target.name}"
    return [p for p in target.parent.iterdir()
            if p.name.startswith(stem + PARTIAL) or p.name.startswith(stem + OLD)]


def is_temporary(name: str) -> bool:
    return name.startswith(".") and (PARTIAL in name or OLD in name)


def remove_leftovers(target: Path) -> list[Path]:
    """Clear what killed writers left next to `target`; returns what was removed.

    A moved-aside `.old-` folder with no `target` is the previous complete version (the writer died between its
    two renames): it is put back rather than removed.
    """
    removed: list[Path] = []
    stem = f".{target.name}"
    for p in sorted(temporaries(target), key=lambda p: OLD not in p.name):  # `.old-` first: it may be restored
        tail = p.name[len(stem):].split("-")
        if len(tail) < 2 or not tail[1].isdigit() or _pid_alive(int(tail[1])):
            continue
        if p.name.startswith(stem + OLD) and not target.exists() and not target.is_symlink():
            os.rename(p, target)
            continue
        _remove(p)
        removed.append(p)
    return removed


def write_text_atomic(target: Path, text: str) -> None:
    """A small text file (a report, a manifest) replaced whole or not at all."""
    with AtomicTarget(target, overwrite=True, is_dir=False) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_private_json(target: Path, data: Any, *, indent: int | None = None) -> None:
    """A small JSON file that only its owner may read (the worker's runtime file, a run's index record): created
    with mode 0600, so it is never readable by others even for a moment, and replaced whole, so a reader never
    sees half of it."""
    tmp = target.with_name(f".{target.name}{PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class AtomicTarget:
    """Context manager yielding a hidden staging path that replaces `target` only when the block succeeds.

    A target that exists and is not empty is refused unless `overwrite`. `needed` is the expected size of the
    output, used in the disk-full message (what was written so far is used when larger or not given).
    """

    def __init__(self, target: str | os.PathLike[str], *, overwrite: bool, is_dir: bool,
                 needed: int | None = None) -> None:
        self.target = Path(target).expanduser().absolute()
        self.overwrite = overwrite
        self.is_dir = is_dir
        self.needed = needed
        self.staging = self.target.parent / f".{self.target.name}{PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.check()

    def check(self) -> None:
        t = self.target
        if not t.exists():
            return
        if self.is_dir and not t.is_dir():
            raise TargetExistsError(f"{t} is a file, but a folder goes there: remove it or choose another path")
        if not self.is_dir and t.is_dir():
            raise TargetExistsError(f"{t} is a folder, but a single file goes there: choose a file name like model.gguf")
        if (self.is_dir and not any(t.iterdir())) or self.overwrite:
            return
        what = "folder exists and is not empty" if self.is_dir else "file already exists"
        raise TargetExistsError(f"{t}: the {what}. Pass overwrite=True to replace it, or choose another path.")

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.target)
        self.check()  # a restored `.old-` folder is the target again
        if self.is_dir:
            self.staging.mkdir()
        return self.staging

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            self._fail(exc)
            return
        try:
            _fsync_tree(self.staging)
            self.check()  # something may have appeared there while we were writing
            self._commit()
        except BaseException as e:
            self._fail(e)
            raise

    def _fail(self, exc: BaseException) -> None:
        """Remove the partial output; a full disk becomes an error that says where and how much."""
        written = tree_bytes(self.staging) if self.staging.exists() else 0
        _remove(self.staging)
        if is_disk_full(exc) and not isinstance(exc, InsufficientDiskSpaceError):
            raise disk_full_error(self.target, max(self.needed or 0, written), self.is_dir) from exc

    def _commit(self) -> None:
        parent = self.target.parent
        if not self.is_dir or not self.target.exists():
            os.replace(self.staging, self.target)
        else:
            old = parent / f".{self.target.name}{OLD}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(self.target, old)
            try:
                os.rename(self.staging, self.target)
            except BaseException:
                os.rename(old, self.target)
                raise
            _fsync_path(parent)
            _remove(old)
        _fsync_path(parent)
