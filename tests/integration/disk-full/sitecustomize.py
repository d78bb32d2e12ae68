"""A full disk for the integration tests, injected into the worker from outside the package.

Python imports `sitecustomize` at start-up from the path; tests/integration/disk-full.test.ts puts this folder on
PYTHONPATH for the worker it starts. While the file named by QWENBOOK_TEST_DISK_FULL_FLAG exists, writes to files
opened inside a writer's hidden staging sibling (`.<name>.partial-...`) fail with ENOSPC after 64 kB, as on a disk
that fills up mid-write. Without the variable, or without the file, nothing changes.
"""

from __future__ import annotations

import builtins
import errno
import os
from typing import Any

_FLAG = os.environ.get("QWENBOOK_TEST_DISK_FULL_FLAG")
_BUDGET = 64 * 1024


class _FillingFile:
    def __init__(self, f: Any) -> None:
        self._f = f
        self._left = _BUDGET

    def write(self, data: Any) -> int:
        if len(data) <= self._left:
            self._left -= len(data)
            return self._f.write(data)
        self._f.write(data[:self._left])
        self._left = 0
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> "_FillingFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.__exit__(*exc)


if _FLAG:
    _real_open = builtins.open

    def _open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = _real_open(file, mode, *args, **kwargs)
        if (isinstance(file, (str, os.PathLike)) and ".partial-" in os.fspath(file) and any(c in mode for c in "wax")
                and os.path.exists(_FLAG)):
            return _FillingFile(f)
        return f

    builtins.open = _open
