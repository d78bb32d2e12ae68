"""What every handler module shares: the job a request becomes, who is connected, and the lock that parks a
served model while a job changes it. The dispatch table and the capability modules all import this; it imports
none of them."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from qwenbook_bridge.protocol import Message

Emit = Callable[[str, dict[str, Any]], None]


class ProtocolVersionMismatch(Exception):
    """The client speaks another major protocol version than this worker."""


@dataclass
class JobContext:
    request: Message
    cancel: threading.Event
    emit: Emit  # (event msg_type, content): sent to the requester with this request as parent


JobHandler = Callable[[JobContext], dict[str, Any]]


class Sessions:
    """The process behind each client session (from its hello), to tell a running notebook from a gone one.

    A model counts the sessions that loaded it as its users; a kernel that crashed or was restarted never
    unloads, so its session stops counting once its process is gone rather than pinning the model forever.
    A session whose process cannot be checked (no pid in its hello, or another host) counts while it lasts.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._processes: dict[str, tuple[int | None, str | None]] = {}
        self._host = socket.gethostname()

    def hello(self, session: str, pid: int | None, host: str | None) -> None:
        with self._lock:
            self._processes[session] = (pid, host)

    def alive(self, session: str) -> bool:
        with self._lock:
            pid, host = self._processes.get(session, (None, None))
        if pid is None or (host is not None and host != self._host):
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with self._lock:
                self._processes.pop(session, None)
            return False
        except PermissionError:  # alive, owned by another user
            return True
        return True


# Holds a served model's HTTP batch scheduler parked while a job changes the model (LoRA layers in it).
Exclusive = Callable[[str], AbstractContextManager[None]]


def no_exclusive(_: str) -> AbstractContextManager[None]:
    return nullcontext()
