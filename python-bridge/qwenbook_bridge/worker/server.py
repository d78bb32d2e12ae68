"""The ZeroMQ side of the worker: a ROUTER for requests, a PUB for telemetry, one job thread for GPU work.

The main thread owns every socket the clients see. It answers control requests (hello, status, cancel,
shutdown) at once, even while a generation runs, and forwards what the job thread produces: the job thread
signs its events and replies and pushes them over an inproc PUSH/PULL pair that the main loop polls next to
the ROUTER, so a token costs one inproc hop and no sleeps. A training run gets a thread of its own (with its
own PUSH socket), so it holds up neither control requests nor work on other models.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import zmq

from qwenbook_bridge.engine import EngineError, memory_snapshot
from qwenbook_bridge.handlers.dispatch import Handlers
from qwenbook_bridge.handlers.context import JobContext, ProtocolVersionMismatch
from qwenbook_bridge.worker.job_lanes import JobLanes, ModelFree
from qwenbook_bridge.protocol import (REQUESTS, InvalidContentError, MalformedMessageError, Message, SignatureError, Signer,
    check, error_content, exception_content, make_message, now_iso, parse, reply_type, serialize, validate_request)

log = logging.getLogger("qwenbook.worker")

GPU_EVENT_INTERVAL_S = 1.0
CONTROL_REQUESTS = ("hello", "status", "cancel", "shutdown")  # answered on the main thread, never queued
_DRAIN_BATCH = 512  # messages handled per socket per wake-up, so one busy socket cannot starve the other
_STOP_GRACE_S = 10.0  # how long a running job gets to notice cancellation at shutdown
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # per message, all frames together (protocol.json says so)
MAX_MESSAGE_ENV = "QWENBOOK_MAX_MESSAGE_BYTES"
REPLAY_WINDOW = 65536  # msg_ids remembered; a signed message whose msg_id is among them is a replay
# A signed message is only accepted while its header date is this recent: its msg_id is remembered at least that
# long (unless the window fills up first, see _date_problem), so a capture replayed later is refused by date.
REPLAY_MAX_AGE_S = 300.0
# Client and worker share a clock (same machine), so this only absorbs rounding and a slow send queue.
CLOCK_SKEW_S = 30.0
UNIX_SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes on Linux (104 on macOS) with the terminating NUL


def max_message_bytes(value: int | None = None) -> int:
    """The size limit: an explicit value, else $QWENBOOK_MAX_MESSAGE_BYTES, else 64 MiB."""
    if value is None:
        raw = os.environ.get(MAX_MESSAGE_ENV, "")
        try:
            value = int(raw) if raw else DEFAULT_MAX_MESSAGE_BYTES
        except ValueError:
            raise ValueError(f"{MAX_MESSAGE_ENV}={raw!r} is not a whole number of bytes") from None
    if value < 4096:
        raise ValueError(f"the message size limit must be at least 4096 bytes, got {value}")
    return value


def dispatch_gaps(handled: set[str]) -> tuple[list[str], list[str]]:
    """Requests the schema declares without a handler, and handlers the schema does not declare."""
    return sorted(set(REQUESTS) - handled), sorted(handled - set(REQUESTS))


def ipc_endpoint(folder: Path, name: str) -> str:
    """`ipc://folder/name`, refused when the path is too long for a Unix socket (which would bind to a cut name)."""
    path = str(folder / name)
    limit = 103 if os.uname().sysname == "Darwin" else UNIX_SOCKET_PATH_MAX
    if len(os.fsencode(path)) > limit:
        raise ValueError(f"the socket path {path} is {len(os.fsencode(path))} bytes, over the {limit}-byte limit of "
                         "Unix domain sockets; use a shorter runtime folder (QWENBOOK_RUNTIME_DIR) or TCP "
                         "(--transport tcp / QWENBOOK_TRANSPORT=tcp)")
    return f"ipc://{path}"


def header_time(date: str) -> float | None:
    """The header's date as a Unix time, or None when it is not an ISO 8601 time with a zone."""
    try:
        parsed = datetime.fromisoformat(date)
    except ValueError:
        return None
    return parsed.timestamp() if parsed.tzinfo is not None else None


@dataclass
class InFlight:
    request: Message
    cancel: threading.Event
    started: str


class WorkerServer:
    def __init__(self, key: str, ip: str = "127.0.0.1", handlers: Handlers | None = None,
                 max_message: int | None = None, ipc_dir: Path | None = None, ipc_name: str = "qwenbook-worker") -> None:
        """Binds on TCP `ip` (random ports), or, with `ipc_dir`, on Unix sockets `<ipc_dir>/<ipc_name>-router`
        and `-pub`: the folder's permissions then decide who may connect (worker/process.py makes it user-only)."""
        self.signer = Signer(key)
        self.session = str(uuid.uuid4())
        self.handlers = handlers or Handlers()
        self.max_message = max_message_bytes(max_message)
        self._seen: OrderedDict[str, float] = OrderedDict()  # msg_id -> when it arrived (Unix time)
        self._ctx = zmq.Context()
        self.router = self._ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 1000)
        # ZeroMQ disconnects a peer that sends one frame above this before buffering it, so a huge frame never
        # reaches memory; messages whose frames only add up to too much are dropped in _handle_request.
        self.router.setsockopt(zmq.MAXMSGSIZE, self.max_message)
        # A ROUTER silently drops what exceeds the high-water mark; a reader that falls behind must get every
        # token late rather than a reply with holes. (Telemetry on the PUB may drop: the next one replaces it.)
        self.router.setsockopt(zmq.SNDHWM, 0)
        self.pub = self._ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 1000)
        self.router_port: int | None = None
        self.pub_port: int | None = None
        self._socket_files: list[Path] = []
        if ipc_dir is None:
            self.transport = "tcp"
            self.router_port = self.router.bind_to_random_port(f"tcp://{ip}")
            self.pub_port = self.pub.bind_to_random_port(f"tcp://{ip}")
            self.router_endpoint = f"tcp://{ip}:{self.router_port}"
            self.pub_endpoint = f"tcp://{ip}:{self.pub_port}"
        else:
            self.transport = "ipc"
            self.router_endpoint = ipc_endpoint(ipc_dir, f"{ipc_name}-router")
            self.pub_endpoint = ipc_endpoint(ipc_dir, f"{ipc_name}-pub")
            for sock, where in ((self.router, self.router_endpoint), (self.pub, self.pub_endpoint)):
                sock.bind(where)  # libzmq replaces a socket file a dead worker left behind
                self._socket_files.append(Path(where.removeprefix("ipc://")))
        self._jobs_endpoint = f"inproc://qwenbook-jobs-{self.session}"
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(self._jobs_endpoint)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

        self._control: dict[str, Callable[[Message], dict[str, Any]]] = {
            "hello": lambda m: self.handlers.hello(m.content, m.session),
            "status": lambda m: self.handlers.status(self._running_list()),
            "cancel": self._cancel,
            "shutdown": self._shutdown,
        }
        assert tuple(self._control) == CONTROL_REQUESTS
        for name, handler in self.handlers.controls().items():
            self._control[name] = lambda m, h=handler: h(m.content)
        self._jobs = self.handlers.jobs()
        self._unimplemented, extra = dispatch_gaps(set(self._control) | set(self._jobs))
        if extra:
            raise RuntimeError(f"handlers for {extra} have no entry in protocol.json's x-requests")
        if self._unimplemented:
            log.warning("protocol.json declares requests this worker does not handle yet: %s", self._unimplemented)

        self._queue: queue.Queue[InFlight | ModelFree | None] = queue.Queue()
        # Training gets a thread of its own; other work for the model it trains waits for it (worker/job_lanes.py).
        # Chats get one each too, so that several run at once (the chat engine batches them).
        self._lanes = JobLanes(self._run_job, self._open_push, getattr(self.handlers, "background", frozenset()),
                               self._queue.put, getattr(self.handlers, "concurrent", frozenset()))
        self._running: dict[str, InFlight] = {}
        self._busy = False
        self._next_gpu_event = 0.0
        self._stop_reason: str | None = None
        self._job_thread_exited = False
        self._job_thread = threading.Thread(target=self._job_loop, name="qwenbook-jobs", daemon=True)

    # ------------------------------------------------------------ lifecycle

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the worker cleanly; the wakeup fd breaks the main loop out of its poll."""
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

        def on_signal(signum: int, _frame: Any) -> None:
            self._stop_reason = self._stop_reason or f"signal {signal.Signals(signum).name}"

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def stop(self, reason: str) -> None:
        """Ask the main loop to stop (safe from any thread)."""
        self._stop_reason = self._stop_reason or reason
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def serve_forever(self) -> bool:
        """Run until shutdown; True when every job finished (False: a job ignored cancellation)."""
        self._job_thread.start()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        log.info("serving: router %s, pub %s", self.router_endpoint, self.pub_endpoint)
        while self._stop_reason is None:
            timeout = None
            if self._busy:
                timeout = max(0.0, (self._next_gpu_event - time.monotonic()) * 1000)
            for sock, _ in poller.poll(timeout):
                if sock is self.router:
                    self._drain_router()
                elif sock is self._pull:
                    self._drain_jobs()
                else:
                    self._drain_wakeups()
            if self._busy and time.monotonic() >= self._next_gpu_event:
                self._gpu_event()
        return self._finish()

    def _finish(self) -> bool:
        log.info("stopping (%s)", self._stop_reason)
        try:
            self.handlers.close()  # HTTP servers first: their clients get a clean end, not a cut connection
        except Exception:
            log.exception("closing the handlers failed")
        self._broadcast("worker_status", {"state": "stopping", "running": len(self._running)})
        for item in self._running.values():
            item.cancel.set()
        self._queue.put(None)
        deadline = time.monotonic() + _STOP_GRACE_S
        while not self._job_thread_exited and time.monotonic() < deadline:
            if self._pull.poll(max(0.0, deadline - time.monotonic()) * 1000):
                self._drain_jobs()
        finished = self._job_thread_exited
        if not finished:
            log.error("a job did not stop within %.0f s of being cancelled; exiting without it", _STOP_GRACE_S)
        for sock in (self.router, self.pub):
            sock.close()
        for path in self._socket_files:
            path.unlink(missing_ok=True)
        self._wake_r.close()
        self._wake_w.close()
        if finished:
            self._pull.close()
            self._ctx.term()
        return finished

    # ------------------------------------------------------------ main thread: requests

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _drain_router(self) -> None:
        for _ in range(_DRAIN_BATCH):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_request(frames)

    def _send_reply(self, request: Message, content: dict[str, Any]) -> None:
        msg = make_message(reply_type(request.msg_type), content, self.session, parent=request)
        self.router.send_multipart(serialize(msg, self.signer))

    def _on_request(self, frames: list[bytes]) -> None:
        try:
            self._handle_request(frames)
        except Exception:  # a bug in handling one message must not take the worker down
            log.exception("internal error while handling a request")

    def _handle_request(self, frames: list[bytes]) -> None:
        size = sum(len(f) for f in frames)
        if size > self.max_message:
            log.warning("dropped a %d-byte message (%d frames) from peer %s: over the %d-byte limit (%s)", size,
                        len(frames), frames[0].hex()[:16] if frames else "?", self.max_message, MAX_MESSAGE_ENV)
            return
        try:
            msg = parse(frames, self.signer)
        except SignatureError as e:
            sender = frames[0].hex()[:16] if frames else "?"
            log.warning("dropped a message with an %s from peer %s (%d frames): the sender does not hold this "
                        "worker's key", e, sender, len(frames))
            return
        except MalformedMessageError as e:
            log.warning("dropped a malformed message: %s", e)
            return
        try:
            # A reply carries the request's header as its parent_header, so one that breaks the schema could
            # only be answered with a message the client must reject.
            check("Header", msg.header, "request header")
        except InvalidContentError as e:
            log.warning("dropped a message with an invalid header: %s", e)
            return
        kind = msg.msg_type
        problem = self._date_problem(msg.header["date"])
        if problem is not None:
            # A capture replayed after its msg_id left the window would otherwise pass as new.
            log.warning("dropped a %s %s (session %s): its date %s %s", kind[:64], msg.msg_id[:64],
                        str(msg.session)[:64], str(msg.header["date"])[:64], problem)
            return
        if msg.msg_id in self._seen:
            # Only a key holder can sign, so this is a captured message sent again (or a client bug): running
            # it twice could repeat a shutdown or a write, and answering it would tell the sender it worked.
            log.warning("dropped a replayed %s %s (session %s): this msg_id was seen among the last %d messages",
                        kind[:64], msg.msg_id[:64], str(msg.session)[:64], REPLAY_WINDOW)
            return
        arrived = time.time()
        self._seen[msg.msg_id] = arrived
        if len(self._seen) > REPLAY_WINDOW:
            self._seen.popitem(last=False)
        # Ids older than the date limit cannot pass the date check again, so they need no remembering.
        while self._seen and next(iter(self._seen.values())) < arrived - REPLAY_MAX_AGE_S - CLOCK_SKEW_S:
            self._seen.popitem(last=False)
        log.info("%s %s from session %s", kind, msg.msg_id, msg.session)
        if kind not in REQUESTS:
            known = ", ".join(sorted(REQUESTS))
            self._send_reply(msg, error_content(
                "UnknownMessageType", f"this worker does not understand {kind!r} requests (it knows: {known}); "
                "update the worker or the client so that their protocol versions match"))
            return
        if kind in self._unimplemented:
            self._send_reply(msg, error_content(
                "UnsupportedRequest", f"this worker does not implement {kind!r} requests yet; update qwenbook_bridge"))
            return
        try:
            validate_request(kind, msg.content)
        except InvalidContentError as e:
            self._send_reply(msg, error_content("InvalidRequest", str(e)))
            return
        if kind in self._control:
            try:
                content = self._control[kind](msg)
            except (ProtocolVersionMismatch, EngineError) as e:
                log.warning("%s refused: %s", kind, e)
                content = error_content(type(e).__name__, str(e))
            except Exception as e:
                log.exception("%s failed", kind)
                content = exception_content(e)
            self._send_reply(msg, content)
            return
        if msg.msg_id in self._running:
            self._send_reply(msg, error_content(
                "DuplicateRequest", f"a request with msg_id {msg.msg_id} is already running; use a fresh msg_id"))
            return
        item = InFlight(msg, threading.Event(), now_iso())
        self._running[msg.msg_id] = item
        self._queue.put(item)
        self._set_busy()

    def _date_problem(self, date: str) -> str | None:
        """Why a header date is outside the replay window, or None when it is inside."""
        sent = header_time(date)
        if sent is None:
            return "is not an ISO 8601 time with a time zone"
        now = time.time()
        if sent > now + CLOCK_SKEW_S:
            return f"is {sent - now:.0f} s in the future (more than the {CLOCK_SKEW_S:.0f} s allowed)"
        if sent < now - REPLAY_MAX_AGE_S:
            return f"is {now - sent:.0f} s old, beyond the {REPLAY_MAX_AGE_S:.0f} s replay window"
        if len(self._seen) >= REPLAY_WINDOW:
            # The window is full, so ids that arrived before its oldest one have been forgotten: a message made
            # before then could be one of them sent again.
            oldest = next(iter(self._seen.values()))
            if sent < oldest - CLOCK_SKEW_S:
                return "is older than the oldest message the replay window still remembers"
        return None

    def _running_list(self) -> list[dict[str, Any]]:
        return [{"msg_id": i.request.msg_id, "msg_type": i.request.msg_type, "session": i.request.session,
                 "started": i.started} for i in self._running.values()]

    def _cancel(self, msg: Message) -> dict[str, Any]:
        item = self._running.get(msg.content["target"])
        if item is not None:
            item.cancel.set()
            log.info("cancel %s (%s) at the request of session %s", item.request.msg_id, item.request.msg_type,
                     msg.session)
            # Forward what the job produced before the flag was set, so that at most the one step in progress
            # can still arrive after this reply. All of it: a job that outran this thread can have left more than a
            # batch, and with the flag set it adds at most one step more.
            self._drain_jobs(limit=None)
        return {"status": "ok", "cancelled": item is not None}

    def _shutdown(self, msg: Message) -> dict[str, Any]:
        self._stop_reason = f"shutdown requested by session {msg.session}"
        return {"status": "ok"}

    # ------------------------------------------------------------ main thread: job output and telemetry

    def _drain_jobs(self, limit: int | None = _DRAIN_BATCH) -> None:
        """Forward what the job thread produced (up to `limit` messages, None: all); notes when it has exited."""
        for _ in itertools.count() if limit is None else range(limit):
            try:
                frames = self._pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            tag = frames[0]
            if tag == b"out":
                self.router.send_multipart(frames[1:])
            elif tag == b"done":
                self._running.pop(frames[1].decode(), None)
                self._set_busy()
            elif tag == b"exit":
                self._job_thread_exited = True

    def _set_busy(self) -> None:
        busy = bool(self._running)
        if busy == self._busy:
            return
        self._busy = busy
        self._broadcast("worker_status", {"state": "busy" if busy else "idle", "running": len(self._running)})
        # One snapshot as work starts and one as it ends, so a gauge shows both the rise and the release.
        self._gpu_event()

    def _gpu_event(self) -> None:
        self._next_gpu_event = time.monotonic() + GPU_EVENT_INTERVAL_S
        try:
            devices = memory_snapshot()
        except Exception as e:  # telemetry must never take the worker down
            log.warning("memory snapshot failed: %s", e)
            return
        content: dict[str, Any] = {"devices": devices, "time": time.time()}
        try:
            # Whose memory it is: the paged engines' caches, often most of a GPU, taken when they start.
            content["engines"] = self.handlers.engine_caches()
        except Exception as e:  # the devices' figures still go out
            log.warning("reading the engines' cache figures failed: %s", e)
        self._broadcast("gpu", content)

    def _broadcast(self, msg_type: str, content: dict[str, Any]) -> None:
        msg = make_message(msg_type, content, self.session)
        self.pub.send_multipart([msg_type.encode(), *serialize(msg, self.signer)])

    # ------------------------------------------------------------ job thread

    def _open_push(self) -> zmq.Socket:
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(self._jobs_endpoint)
        return push

    def _job_loop(self) -> None:
        push = self._open_push()
        try:
            while (item := self._queue.get()) is not None:
                if isinstance(item, ModelFree):
                    self._lanes.release(item, push)
                else:
                    self._lanes.dispatch(item, push)
        finally:
            self._lanes.finish(push, _STOP_GRACE_S - 1)
            push.send_multipart([b"exit"])
            push.close()

    def _run_job(self, item: InFlight, push: zmq.Socket) -> None:
        request = item.request

        def emit(event_type: str, content: dict[str, Any]) -> None:
            msg = make_message(event_type, content, self.session, parent=request)
            push.send_multipart([b"out", *serialize(msg, self.signer)])

        started = time.perf_counter()
        try:
            content = self._jobs[request.msg_type](JobContext(request, item.cancel, emit))
        except EngineError as e:
            log.warning("%s %s failed: %s: %s", request.msg_type, request.msg_id, type(e).__name__, e)
            content = exception_content(e)
        except Exception as e:
            log.exception("%s %s failed", request.msg_type, request.msg_id)
            content = exception_content(e)
        reply = make_message(reply_type(request.msg_type), content, self.session, parent=request)
        try:
            frames = serialize(reply, self.signer)
        except (TypeError, ValueError) as e:
            log.exception("%s reply could not be encoded", request.msg_type)
            reply.content = exception_content(e)
            frames = serialize(reply, self.signer)
        log.info("%s %s done in %.0f ms: %s", request.msg_type, request.msg_id, (time.perf_counter() - started) * 1000,
                 content.get("status"))
        push.send_multipart([b"out", *frames])
        push.send_multipart([b"done", request.msg_id.encode()])
