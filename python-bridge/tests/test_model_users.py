"""Models shared by several notebooks: each client session that loads a model is one of its users, an unload
from one of them frees the model only when no other live session uses it (or with force), and a session whose
process is gone (a crashed kernel) stops counting."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from qwenbook_bridge import PROTOCOL_VERSION
from wire import TIMEOUT_S, Client


def kernel_process() -> subprocess.Popen[bytes]:
    """Stands in for a notebook kernel: a process whose pid a client sends in its hello."""
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)


def hello(client: Client, pid: int | None) -> None:
    content = {"protocol_version": PROTOCOL_VERSION, "client": "test"}
    if pid is not None:
        content |= {"pid": pid, "host": socket.gethostname()}
    reply, _ = client.call("hello", content)
    assert reply.msg_type == "hello_reply" and reply.content["status"] == "ok", reply.content


def load(client: Client, model: str) -> str:
    reply, _ = client.call("load", {"model": model, "dtype": "fp32"})
    assert reply.content["status"] == "ok", reply.content
    return reply.content["model"]["model_id"]


def loaded(client: Client) -> list[str]:
    reply, _ = client.call("status", {})
    return [m["model_id"] for m in reply.content["models"]]


@pytest.fixture()
def clients(worker):
    made: list[Client] = []

    def make() -> Client:
        made.append(Client(worker.info))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_an_unload_frees_the_model_only_when_no_other_live_session_uses_it(clients, tiny_model_dir):
    kernel = kernel_process()
    try:
        a, b = clients(), clients()
        hello(a, kernel.pid)
        hello(b, None)  # a client that sends no pid counts as alive for as long as it has the model
        model_id = load(a, str(tiny_model_dir))
        assert load(b, str(tiny_model_dir)) == model_id

        reply, _ = b.call("unload", {"model_id": model_id})
        assert reply.content == {"status": "ok", "unloaded": False, "other_users": 1}
        assert model_id in loaded(a)
        # b's use was dropped: a's unload now frees the model.
        reply, _ = a.call("unload", {"model_id": model_id})
        assert reply.content == {"status": "ok", "unloaded": True, "other_users": 0}
        assert model_id not in loaded(a)
        reply, _ = a.call("unload", {"model_id": model_id})
        assert reply.content == {"status": "ok", "unloaded": False, "other_users": 0}
    finally:
        kernel.kill()
        kernel.wait(TIMEOUT_S)


def test_force_frees_it_for_everyone_and_a_session_whose_process_is_gone_stops_counting(clients, tiny_model_dir):
    kernel = kernel_process()
    try:
        a, b = clients(), clients()
        hello(a, kernel.pid)
        hello(b, None)
        model_id = load(a, str(tiny_model_dir))
        load(b, str(tiny_model_dir))
        reply, _ = b.call("unload", {"model_id": model_id, "force": True})
        assert reply.content == {"status": "ok", "unloaded": True, "other_users": 1}
        assert model_id not in loaded(b)

        load(a, str(tiny_model_dir))
        load(b, str(tiny_model_dir))
        kernel.kill()  # a's kernel crashes without unloading
        kernel.wait(TIMEOUT_S)
        reply, _ = b.call("unload", {"model_id": model_id})
        assert reply.content == {"status": "ok", "unloaded": True, "other_users": 0}
    finally:
        kernel.kill()
        kernel.wait(TIMEOUT_S)


def test_a_new_hello_from_a_session_updates_its_process(clients, tiny_model_dir):
    old, new = kernel_process(), kernel_process()
    try:
        a, b = clients(), clients()
        hello(a, old.pid)
        hello(b, None)
        model_id = load(a, str(tiny_model_dir))
        load(b, str(tiny_model_dir))
        hello(a, new.pid)  # the same session, reconnected from another process
        old.kill()
        old.wait(TIMEOUT_S)
        reply, _ = b.call("unload", {"model_id": model_id})
        assert reply.content == {"status": "ok", "unloaded": False, "other_users": 1}
        reply, _ = a.call("unload", {"model_id": model_id})
        assert reply.content["unloaded"] is True
    finally:
        for p in (old, new):
            p.kill()
            p.wait(TIMEOUT_S)


def test_a_session_that_put_an_adapter_on_the_model_uses_it_too(clients, tiny_model_dir, tmp_path):
    a, c = clients(), clients()
    hello(a, None)
    hello(c, None)
    model_id = load(a, str(tiny_model_dir))
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(4)]
    config = {"output_dir": str(tmp_path / "run"), "max_length": 32, "batch_size": 2, "grad_accum": 1, "max_steps": 1,
              "lora": {"r": 4}}
    trained, _ = a.call("train", {"model_id": model_id, "config": config, "datasets": [{"rows": rows}]})
    assert trained.content["status"] == "ok", trained.content
    # c never loaded the model: it found it in the worker and put the adapter on it (qwen.adapters.load).
    put, _ = c.call("adapter_load", {"model_id": model_id, "path": trained.content["adapter_path"]})
    assert put.content["status"] == "ok", put.content
    reply, _ = a.call("unload", {"model_id": model_id})
    assert reply.content == {"status": "ok", "unloaded": False, "other_users": 1}
    reply, _ = c.call("unload", {"model_id": model_id})
    assert reply.content == {"status": "ok", "unloaded": True, "other_users": 0}
