"""How clients reach the worker: Unix domain sockets in a user-only folder by default, TCP only when asked."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import psutil
import pytest

from qwenbook_bridge.worker.server import ipc_endpoint
from qwenbook_bridge.worker.process import IPC_DIR_NAME, ipc_folder
from wire import Client, WorkerProcess


def _listening_tcp_ports(pid: int) -> list[int]:
    return [c.laddr.port for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]


def _status_ok(info: dict) -> None:
    client = Client(info)
    try:
        reply, _ = client.call("status", {})
        assert reply.content["status"] == "ok"
    finally:
        client.close()


def test_the_default_transport_is_ipc_in_a_user_only_folder_with_no_tcp_port(worker):
    info = worker.info
    assert info["transport"] == "ipc" and "router_port" not in info and "ip" not in info
    folder = worker.runtime_file.parent / IPC_DIR_NAME
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()
    for name in ("router_endpoint", "pub_endpoint"):
        path = Path(info[name].removeprefix("ipc://"))
        assert path.parent == folder and stat.S_ISSOCK(path.stat().st_mode)
    _status_ok(info)
    assert _listening_tcp_ports(worker.proc.pid) == []


def test_an_existing_sockets_folder_open_to_others_is_made_private(tmp_path):
    folder = tmp_path / "runtime" / IPC_DIR_NAME
    folder.mkdir(parents=True, mode=0o755)
    os.chmod(folder, 0o755)
    assert ipc_folder(tmp_path / "runtime", "qwenbook-worker") == folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


@pytest.mark.parametrize("how", ["flag", "env"])
def test_tcp_only_when_asked(tmp_path, how):
    proc = WorkerProcess(tmp_path, args=["--transport", "tcp"] if how == "flag" else [],
                         env={"QWENBOOK_TRANSPORT": "tcp"} if how == "env" else {})
    try:
        info = proc.info
        assert info["transport"] == "tcp" and info["ip"] == "127.0.0.1"
        assert info["router_endpoint"] == f"tcp://127.0.0.1:{info['router_port']}"
        assert sorted(_listening_tcp_ports(proc.proc.pid)) == sorted([info["router_port"], info["pub_port"]])
        _status_ok(info)
    finally:
        proc.stop()


def test_an_unknown_transport_is_refused_with_the_choices(tmp_path):
    proc_env = {"QWENBOOK_TRANSPORT": "udp"}
    with pytest.raises(RuntimeError, match=r"QWENBOOK_TRANSPORT='udp' is not a transport: use ipc or tcp"):
        WorkerProcess(tmp_path, env=proc_env)


def test_a_socket_path_over_the_unix_limit_is_refused_with_the_fix():
    deep = Path("/tmp") / ("d" * 120)
    with pytest.raises(ValueError, match=r"over the 10[37]-byte limit of Unix domain sockets; use a shorter runtime "
                                         r"folder \(QWENBOOK_RUNTIME_DIR\) or TCP"):
        ipc_endpoint(deep, "qwenbook-worker-router")


def test_a_runtime_folder_too_deep_for_sockets_falls_back_to_a_short_private_one(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    proc = WorkerProcess(deep)
    try:
        info = proc.info
        folder = Path(info["router_endpoint"].removeprefix("ipc://")).parent
        assert len(str(folder)) < len(str(deep)) and not (deep / "runtime" / IPC_DIR_NAME).exists()
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        _status_ok(info)
        assert "over the" in proc.log() and f"binding in {folder} instead" in proc.log()
    finally:
        proc.stop()
    assert not folder.exists()  # made for that worker only, removed when it stops
