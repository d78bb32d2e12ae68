"""The worker process: `python -m qwenbook_bridge.worker`.

It binds its sockets, then writes a user-only runtime file with the endpoints, pid and HMAC key (clients find
the worker through it), serves until `shutdown` or SIGTERM/SIGINT, and removes the file on a clean exit.

On Linux and macOS the sockets are Unix domain sockets (ZeroMQ ipc://) in a user-only folder beside the runtime
file, so other local users cannot even connect; TCP on 127.0.0.1 only when asked (--transport tcp or
$QWENBOOK_TRANSPORT=tcp), and on Windows. Training runs are also recorded in a run index in that folder
(handlers/run_registry.py), so a worker started after a crash lists the runs it cut short as interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

from qwenbook_bridge import PROTOCOL_VERSION, __version__
from qwenbook_bridge.engine.files.atomic_write import write_private_json
from qwenbook_bridge.protocol import now_iso

RUNTIME_FILE_NAME = "qwenbook-worker.json"
LOG_FILE_NAME = "qwenbook-worker.log"
TRANSPORT_ENV = "QWENBOOK_TRANSPORT"
IPC_DIR_NAME = "qwenbook-ipc"  # the sockets' folder, beside the runtime file
RUNS_DIR_NAME = "qwenbook-runs"  # the run index, beside the runtime file
log = logging.getLogger("qwenbook.worker")


def default_runtime_file() -> Path:
    for var in ("QWENBOOK_RUNTIME_DIR", "JUPYTER_RUNTIME_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser() / RUNTIME_FILE_NAME
    return Path.home() / ".local" / "share" / "jupyter" / "runtime" / RUNTIME_FILE_NAME


def default_transport() -> str:
    """$QWENBOOK_TRANSPORT if set, else ipc where Unix domain sockets exist (Linux, macOS), else tcp."""
    chosen = os.environ.get(TRANSPORT_ENV, "").strip().lower()
    if chosen:
        if chosen not in ("ipc", "tcp"):
            raise ValueError(f"{TRANSPORT_ENV}={os.environ[TRANSPORT_ENV]!r} is not a transport: use ipc or tcp")
        return chosen
    return "tcp" if sys.platform == "win32" else "ipc"


def user_only_dir(folder: Path) -> Path:
    """`folder` created 0700 and checked to be ours and private: what it holds (sockets, run records) is
    reachable by whoever can enter it."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{folder} is not a folder (a link or a file); remove it and start again")
    if st.st_uid != os.getuid():
        raise ValueError(f"{folder} belongs to another user (uid {st.st_uid}); remove it or use another runtime "
                         "folder (QWENBOOK_RUNTIME_DIR)")
    if st.st_mode & 0o077:
        os.chmod(folder, 0o700)
    return folder


def ipc_folder(runtime_dir: Path, name: str) -> Path:
    """The sockets' folder: beside the runtime file, or, where that path is too long for a Unix socket
    (about 107 bytes), a fresh private folder from tempfile (0700) with a short path."""
    from qwenbook_bridge.worker.server import ipc_endpoint

    folder = runtime_dir / IPC_DIR_NAME
    try:
        ipc_endpoint(folder, f"{name}-router")
    except ValueError as e:
        import tempfile

        short = Path(tempfile.mkdtemp(prefix="qwenbook-"))
        log.warning("%s; binding in %s instead", e, short)
        return short
    return user_only_dir(folder)


def ensure_private_dir(folder: Path) -> None:
    """Create `folder` as 0700; tighten an existing one we own (a shared, sticky dir like /tmp is left alone)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if st.st_uid == os.getuid() and not st.st_mode & stat.S_ISVTX and st.st_mode & 0o077:
        os.chmod(folder, 0o700)


def write_runtime_file(path: Path, info: dict[str, Any]) -> None:
    """The runtime file holds the HMAC key: user-only from creation, and never seen half written."""
    write_private_json(path, info, indent=2)


def read_runtime_file(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def exposed_file_problem(path: Path) -> str | None:
    """Why an existing runtime file must not be reused, or None: another user owns it or may have read it."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file; remove it and start again"
    if st.st_uid != os.getuid():
        return f"{path} belongs to another user (uid {st.st_uid}); remove it or pass a different --runtime-file"
    if st.st_mode & 0o077:
        return (f"{path} is readable by group/others (mode {stat.S_IMODE(st.st_mode):04o}), so a worker key kept in "
                f"it may have been read; remove it (rm {path}) or make it private (chmod 600 {path}) and start again")
    return None


def remove_runtime_file(path: Path, pid: int) -> None:
    """Remove the file only if it still names `pid`: a newer worker may have replaced it."""
    data = read_runtime_file(path)
    if data is not None and data.get("pid") == pid:
        path.unlink(missing_ok=True)


def live_worker_pid(path: Path) -> int | None:
    """The pid of another running worker that owns `path`, if any (a stale file from a dead one returns None)."""
    import psutil

    data = read_runtime_file(path)
    pid = data.get("pid") if data else None
    if not isinstance(pid, int) or pid == os.getpid() or not psutil.pid_exists(pid):
        return None
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (psutil.Error, OSError):
        return None
    return pid if "qwenbook_bridge" in cmdline else None


def setup_logging(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    if os.fstat(fd).st_uid == os.getuid():
        os.fchmod(fd, 0o600)  # an older log made more open: it names files and models, so keep it private
    handler = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8", buffering=1))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(process)d %(threadName)s] %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)


def route_library_logging() -> None:
    """Library warnings (transformers, hub) belong in the worker log; their progress bars belong nowhere."""
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qwenbook_bridge.worker",
                                description="Qwenbook's model worker: serves load/generate requests over ZeroMQ.")
    p.add_argument("--runtime-file", type=Path, default=None,
                   help=f"where to write the connection file (default: $QWENBOOK_RUNTIME_DIR, $JUPYTER_RUNTIME_DIR or "
                        f"~/.local/share/jupyter/runtime, file {RUNTIME_FILE_NAME})")
    p.add_argument("--device", default="auto", help="default device for loads that say 'auto': auto, cpu, cuda, cuda:N")
    p.add_argument("--transport", choices=("ipc", "tcp"), default=None,
                   help=f"ipc: Unix domain sockets in a user-only folder beside the runtime file (default on Linux and "
                        f"macOS); tcp: ports on --ip, which any local user can connect to (default: ${TRANSPORT_ENV}, "
                        "else ipc, else tcp on Windows)")
    p.add_argument("--ip", default="127.0.0.1", help="address to bind with --transport tcp (default 127.0.0.1; only "
                                                     "this machine)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often fastest for small models on a busy machine)")
    p.add_argument("--root", type=Path, default=None,
                   help="only read and write client-given paths inside this folder (default: $QWENBOOK_ROOT, else "
                        "anywhere); use it when several users share one worker")
    p.add_argument("--max-message-bytes", type=int, default=None,
                   help="refuse requests larger than this (default: $QWENBOOK_MAX_MESSAGE_BYTES or 64 MiB)")
    p.add_argument("--log", type=Path, default=None, help=f"log file (default: {LOG_FILE_NAME} next to the runtime file)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runtime_file = (args.runtime_file or default_runtime_file()).expanduser().absolute()
    log_file = (args.log or runtime_file.parent / LOG_FILE_NAME).expanduser().absolute()
    ensure_private_dir(runtime_file.parent)
    setup_logging(log_file)

    problem = exposed_file_problem(runtime_file)
    if problem is not None:
        log.error("refusing to start: %s", problem)
        print(f"qwenbook worker: refusing to start: {problem}", file=sys.stderr)
        return 1
    other = live_worker_pid(runtime_file)
    if other is not None:
        message = (f"another Qwenbook worker (pid {other}) is running and owns {runtime_file}; attach to it, stop it "
                   "(npx qwenbook worker stop) or pass a different --runtime-file")
        log.error(message)
        print(f"qwenbook worker: {message}", file=sys.stderr)
        return 1

    route_library_logging()
    from qwenbook_bridge.engine import EngineError, resolve_device
    from qwenbook_bridge.handlers.dispatch import Handlers
    from qwenbook_bridge.worker.server import WorkerServer

    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    try:
        resolve_device(args.device)
    except EngineError as e:
        log.error("%s", e)
        print(f"qwenbook worker: {e}", file=sys.stderr)
        return 2

    from qwenbook_bridge.handlers.paths import worker_root

    from qwenbook_bridge.handlers.run_registry import RunIndex

    key = secrets.token_hex(32)
    ipc_dir: Path | None = None
    try:
        transport = args.transport or default_transport()
        if transport == "ipc":
            ipc_dir = ipc_folder(runtime_file.parent, runtime_file.stem)
        root = worker_root(args.root)
        handlers = Handlers(default_device=args.device, root=root)
        index = RunIndex(user_only_dir(runtime_file.parent / RUNS_DIR_NAME))
        recovered = handlers.train.runs.open_index(index)
        server = WorkerServer(key, ip=args.ip, handlers=handlers, max_message=args.max_message_bytes,
                              ipc_dir=ipc_dir, ipc_name=runtime_file.stem)
    except (ValueError, OSError) as e:
        log.error("%s", e)
        print(f"qwenbook worker: {e}", file=sys.stderr)
        return 2
    for run in recovered:
        log.info("run %s (%s) was cut short by a worker that is gone: interrupted at step %d, checkpoint %s",
                 run.run_id, run.output_dir, run.step, run.checkpoint or "none")
    endpoints: dict[str, Any] = {"router_endpoint": server.router_endpoint, "pub_endpoint": server.pub_endpoint}
    if transport == "tcp":
        endpoints = {"ip": args.ip, "router_port": server.router_port, "pub_port": server.pub_port, **endpoints}
    info = {
        "transport": transport,
        **endpoints,
        "key": key,
        "signature_scheme": "hmac-sha256",
        "pid": os.getpid(),
        "protocol_version": PROTOCOL_VERSION,
        "worker_version": __version__,
        "started": now_iso(),
        "python": sys.executable,
        "log": str(log_file),
    }
    server.install_signal_handlers()
    write_runtime_file(runtime_file, info)
    log.info("worker %s (protocol %s) pid %d ready; runtime file %s; client paths %s", __version__, PROTOCOL_VERSION,
             os.getpid(), runtime_file, f"confined to {root}" if root else "unrestricted")
    try:
        clean = server.serve_forever()
    finally:
        remove_runtime_file(runtime_file, os.getpid())
        if ipc_dir is not None and ipc_dir.name != IPC_DIR_NAME:
            shutil.rmtree(ipc_dir, ignore_errors=True)  # the short fallback folder was made for this worker only
    log.info("worker pid %d stopped%s", os.getpid(), "" if clean else " (a job was still running)")
    return 0


def run() -> None:
    """Entry point for the process: everything is closed and flushed by now, so skip the interpreter's
    module teardown, which takes seconds with torch and transformers loaded (and cannot finish at all when
    a job thread is stuck in native code)."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
