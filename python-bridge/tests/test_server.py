"""A real worker process, driven over ZeroMQ the way the TypeScript kernel drives it.

The tests share one worker and run in file order: the last one shuts it down.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qwenbook_bridge import PROTOCOL_VERSION
from qwenbook_bridge.engine import SamplingParams
from qwenbook_bridge.engine.generate.generation import generate
from qwenbook_bridge.handlers.dispatch import Handlers
from qwenbook_bridge.protocol import Signer
from qwenbook_bridge.worker.server import CONTROL_REQUESTS, dispatch_gaps
from wire import TIMEOUT_S, Client, WorkerProcess

CHAT = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "count to five"}]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory):
    """This module's worker with an empty GGUF cache of its own: whether the first load writes the CPU chat copy
    (its cpu_chat stage) must not hang on what other tests or suites left in the shared cache (it keeps 3 copies)."""
    folder = tmp_path_factory.mktemp("worker")
    proc = WorkerProcess(folder, env={"QWENBOOK_GGUF_CACHE": str(folder / "gguf-cache")})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def first_load(client, tiny_model_dir):
    reply, events = client.call("load", {"model": str(tiny_model_dir), "dtype": "fp32"})
    assert reply.content["status"] == "ok", reply.content
    return reply, events


@pytest.fixture(scope="module")
def model_id(first_load):
    return first_load[0].content["model"]["model_id"]


def test_every_request_in_the_schema_has_a_handler():
    handlers = Handlers()
    assert dispatch_gaps(set(CONTROL_REQUESTS) | set(handlers.controls()) | set(handlers.jobs())) == ([], [])


def test_runtime_file_is_private_and_names_the_endpoint(worker):
    info = worker.info
    assert set(info) == {"transport", "router_endpoint", "pub_endpoint", "key", "signature_scheme", "pid",
                         "protocol_version", "worker_version", "started", "python", "log"}
    assert (info["transport"], info["signature_scheme"]) == ("ipc", "hmac-sha256")  # ipc unless TCP is asked for
    sockets = worker.runtime_file.parent / "qwenbook-ipc"
    assert info["router_endpoint"] == f"ipc://{sockets}/qwenbook-worker-router"
    assert info["pub_endpoint"] == f"ipc://{sockets}/qwenbook-worker-pub"
    assert info["pid"] == worker.proc.pid and info["protocol_version"] == PROTOCOL_VERSION
    assert len(info["key"]) == 64 and int(info["key"], 16) >= 0
    assert info["log"] == str(worker.log_file) and Path(info["python"]).resolve() == Path(sys.executable).resolve()
    assert stat.S_IMODE(os.stat(worker.runtime_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(worker.runtime_file.parent).st_mode) == 0o700


def test_hello_checks_the_protocol_version(client):
    reply, _ = client.call("hello", {"protocol_version": PROTOCOL_VERSION, "client": "pytest"})
    assert reply.content["status"] == "ok" and reply.content["devices"][0] == "cpu"
    reply, _ = client.call("hello", {"protocol_version": "2.0", "client": "pytest"})
    assert reply.content["ename"] == "ProtocolVersionMismatch"
    assert "speaks protocol 2.0" in reply.content["evalue"] and "1.0" in reply.content["evalue"]


def test_unknown_types_and_invalid_content_get_error_replies(client):
    reply, _ = client.call("frobnicate", {})
    assert reply.msg_type == "frobnicate_reply" and reply.content["ename"] == "UnknownMessageType"
    assert "'frobnicate'" in reply.content["evalue"] and "generate" in reply.content["evalue"]
    reply, _ = client.call("generate", {"model_id": "m", "messages": [{"role": "user", "content": "hi"}],
                                        "max_tokens": 0})
    assert reply.content["ename"] == "InvalidRequest"
    assert "max_tokens must be at least 1, got 0" in reply.content["evalue"]


def test_a_message_signed_with_the_wrong_key_is_dropped_and_logged(worker, client):
    bad = client.send("status", {}, signer=Signer("00" * 32))
    good = client.send("status", {})
    reply = client.recv()  # the worker answers in order: a reply to `bad` would come first
    assert reply.parent_header["msg_id"] == good.msg_id and reply.parent_header["msg_id"] != bad.msg_id
    assert "invalid signature" in worker.log()
    reply, _ = client.call("hello", {"protocol_version": PROTOCOL_VERSION, "client": "pytest"})
    assert reply.content["status"] == "ok"


def test_load_reports_progress_and_a_second_load_is_resident(client, first_load, model_id, tiny_model_dir):
    reply, events = first_load
    stages = [e.content["stage"] for e in events]
    # The CPU chat's GGUF copy is written under the load's progress (one event per chunk written).
    assert [s for i, s in enumerate(stages) if i == 0 or s != stages[i - 1]] == ["tokenizer", "weights", "cpu_chat",
                                                                                 "ready"]
    assert reply.content["already_loaded"] is False
    assert reply.content["model"]["path"] == str(Path(tiny_model_dir).resolve())
    reply, events = client.call("load", {"model": str(tiny_model_dir), "dtype": "fp32", "device": "cpu"})
    assert reply.content["already_loaded"] is True and reply.content["model"]["model_id"] == model_id
    assert [e.content["stage"] for e in events] == ["ready"]


def test_generate_streams_tokens_that_join_to_the_in_process_reply(client, model_id, tiny):
    reply, events = client.call("generate", {"model_id": model_id, "messages": CHAT, "max_tokens": 48,
                                             "greedy": True})
    content = reply.content
    assert content["status"] == "ok" and content["completion_tokens"] == 48
    assert {e.msg_type for e in events} == {"token"}
    assert "".join(e.content["text"] for e in events) == content["text"]
    assert [t for e in events for t in e.content["token_ids"]] == content["token_ids"]
    local = generate(tiny, CHAT, SamplingParams(max_tokens=48, greedy=True))
    assert content["token_ids"] == local.token_ids and content["text"] == local.text


def test_errors_inside_jobs_come_back_readable_and_the_worker_stays_up(client, model_id, tmp_path):
    reply, _ = client.call("generate", {"model_id": "nope", "messages": CHAT})
    assert reply.content["ename"] == "ModelNotLoadedError"
    assert "'nope' is not loaded" in reply.content["evalue"] and model_id in reply.content["evalue"]
    assert any("Traceback" in line for line in reply.content["traceback"])
    reply, _ = client.call("load", {"model": str(tmp_path / "missing")})
    assert reply.content["ename"] == "ModelNotFoundError" and "does not exist" in reply.content["evalue"]
    reply, _ = client.call("status", {})
    assert reply.content["status"] == "ok"


def test_cancel_stops_a_long_generation_while_control_requests_are_answered(client, model_id):
    client.drain_broadcasts()
    request = client.send("generate", {"model_id": model_id, "messages": CHAT, "max_tokens": 3000,
                                       "greedy": True})
    tokens_before = []
    while len(tokens_before) < 3:
        tokens_before.append(client.recv())
    status = client.send("status", {})
    while True:  # the status reply arrives while tokens keep coming
        msg = client.recv()
        if msg.msg_type == "status_reply":
            break
        tokens_before.append(msg)
    assert status.msg_id == msg.parent_header["msg_id"]
    assert [r["msg_id"] for r in msg.content["running"]] == [request.msg_id]

    cancel = client.send("cancel", {"target": request.msg_id})
    after_cancel, reply = [], None
    seen_cancel_reply = False
    while reply is None:
        msg = client.recv()
        if msg.msg_type == "cancel_reply":
            assert msg.parent_header["msg_id"] == cancel.msg_id and msg.content["cancelled"] is True
            seen_cancel_reply = True
        elif msg.msg_type == "token":
            (after_cancel if seen_cancel_reply else tokens_before).append(msg)
        else:
            reply = msg
    content = reply.content
    assert content["finish_reason"] == "cancelled" and content["completion_tokens"] < 3000
    # At most the step in progress arrives after the reply. Its event also carries the ids held back until then
    # because their text was an incomplete character, so count events with ids, not ids.
    assert len([e for e in after_cancel if e.content["token_ids"]]) <= 1
    assert "".join(e.content["text"] for e in tokens_before + after_cancel) == content["text"]

    # The worker said busy when the request started and idle once it ended, with GPU telemetry meanwhile. (An
    # earlier test's last broadcast can still be on its way when this one drains, so read up to busy first.)
    telemetry = client.broadcasts("worker_status", {"state": "busy"})
    telemetry += client.broadcasts("worker_status", {"state": "idle"})
    assert "gpu" in [m.msg_type for m in telemetry]
    reply, _ = client.call("cancel", {"target": request.msg_id})
    assert reply.content["cancelled"] is False


def test_status_lists_the_loaded_model_and_memory(client, model_id):
    reply, _ = client.call("status", {})
    assert [m["model_id"] for m in reply.content["models"]] == [model_id]
    assert reply.content["running"] == [] and reply.content["memory"][-1]["kind"] == "cpu"
    assert reply.content["devices"][0] == "cpu"  # what a notebook counts GPUs from


def test_a_second_worker_refuses_to_replace_a_live_one(worker):
    second = subprocess.run([sys.executable, "-m", "qwenbook_bridge.worker", "--runtime-file",
                             str(worker.runtime_file)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert second.returncode == 1
    assert f"pid {worker.proc.pid}" in second.stderr
    assert worker.info == json.loads(worker.runtime_file.read_text())


def test_shutdown_cancels_running_work_stops_the_process_and_removes_the_runtime_file(worker, client, model_id):
    running = client.send("generate", {"model_id": model_id, "messages": CHAT, "max_tokens": 3000, "greedy": True})
    assert client.recv().msg_type == "token"
    shutdown = client.send("shutdown", {})
    replies = {}
    while len(replies) < 2:
        msg = client.recv()
        if msg.msg_type != "token":
            replies[msg.parent_header["msg_id"]] = msg.content
    assert replies[shutdown.msg_id] == {"status": "ok"}
    assert replies[running.msg_id]["finish_reason"] == "cancelled"
    assert worker.proc.wait(TIMEOUT_S) == 0
    assert not worker.runtime_file.exists()
    assert "stopped" in worker.log()


def test_sigterm_stops_a_worker_cleanly(tmp_path):
    second = WorkerProcess(tmp_path)
    try:
        client = Client(second.info)
        reply, _ = client.call("hello", {"protocol_version": PROTOCOL_VERSION, "client": "pytest"})
        assert reply.content["pid"] == second.proc.pid
        client.close()
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(TIMEOUT_S) == 0
        assert not second.runtime_file.exists()
        assert "stopping (signal SIGTERM)" in second.log()
    finally:
        second.stop()
