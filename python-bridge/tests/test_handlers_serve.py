"""serve_start / serve_stop / serve_status through a real worker, driven over ZeroMQ like the kernel drives it.

The tests share one worker and run in file order: the last one shuts it down with a server still running.
"""

from __future__ import annotations

import socket
import threading

import httpx
import pytest

from wire import TIMEOUT_S, Client

KEY = "sk-wire-test"
CHAT = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def model_id(client, tiny_model_dir):
    return ok(client, "load", {"model": str(tiny_model_dir), "dtype": "fp32"})["model"]["model_id"]


def ok(client: Client, kind: str, content: dict) -> dict:
    reply, _ = client.call(kind, content)
    assert reply.content["status"] == "ok", reply.content
    return reply.content


def error(client: Client, kind: str, content: dict) -> dict:
    reply, _ = client.call(kind, content)
    assert reply.content["status"] == "error", reply.content
    return reply.content


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def greedy(client: Client, model_id: str, messages: list[dict], n: int) -> dict:
    return ok(client, "generate", {"model_id": model_id, "messages": messages, "greedy": True, "max_tokens": n,
                                   "stream": False})


def test_a_server_reports_its_url_name_and_a_working_curl_example(client, model_id):
    started = ok(client, "serve_start", {"model_id": model_id, "port": 0, "api_key": KEY, "name": "tiny-wire"})
    server = started["server"]
    assert started["already_running"] is False
    assert server["model_id"] == model_id and server["name"] == "tiny-wire" and server["auth"] is True
    assert server["url"] == f"http://127.0.0.1:{server['port']}/v1" and server["stats"]["running"] is True
    assert f"{server['url']}/chat/completions" in server["curl_example"] and f"Bearer {KEY}" in server["curl_example"]

    models = httpx.get(server["url"] + "/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT_S)
    assert [m["id"] for m in models.json()["data"]] == ["tiny-wire"]
    assert httpx.get(server["url"] + "/models", timeout=TIMEOUT_S).status_code == 401
    body = {"model": model_id, "messages": CHAT, "max_tokens": 8, "temperature": 0}  # the handle is an alias
    answer = httpx.post(server["url"] + "/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                        timeout=TIMEOUT_S).json()
    assert answer["choices"][0]["message"]["content"] == greedy(client, model_id, CHAT, 8)["text"]

    listed = ok(client, "serve_status", {})["servers"]
    assert [s["server_id"] for s in listed] == [server["server_id"]]
    assert listed[0]["stats"]["requests_total"] == 1 and listed[0]["stats"]["tokens_generated"] == 8
    assert ok(client, "serve_status", {"model_id": model_id})["servers"][0]["server_id"] == server["server_id"]
    assert ok(client, "serve_status", {"server_id": "nobody@127.0.0.1:1"})["servers"] == []

    again = ok(client, "serve_start", {"model_id": model_id, "port": 0, "api_key": KEY, "name": "tiny-wire"})
    assert again["already_running"] is True and again["server"]["server_id"] == server["server_id"]
    conflict = error(client, "serve_start", {"model_id": model_id, "port": 0, "name": "other-name"})
    assert conflict["ename"] == "ServerConflictError" and server["url"] in conflict["evalue"]

    stopped = ok(client, "serve_stop", {"server_id": server["server_id"]})["stopped"]
    assert [s["server_id"] for s in stopped] == [server["server_id"]] and stopped[0]["stats"]["running"] is False
    assert port_is_free(server["port"])
    assert ok(client, "serve_stop", {"server_id": server["server_id"]})["stopped"] == []
    assert ok(client, "serve_status", {})["servers"] == []
    assert greedy(client, model_id, CHAT, 4)["completion_tokens"] == 4  # the model stayed loaded


def test_a_port_in_use_is_an_error_naming_the_port(client, model_id):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        reply = error(client, "serve_start", {"model_id": model_id, "port": port})
    assert reply["ename"] == "PortInUseError" and f"port {port}" in reply["evalue"]
    assert ok(client, "serve_status", {})["servers"] == []


def test_bad_serve_requests_say_what_is_wrong(client, model_id):
    assert "exactly one of server_id" in error(client, "serve_stop", {})["evalue"]
    assert error(client, "serve_stop", {"server_id": "a", "model_id": model_id})["ename"] == "InvalidOptionError"
    assert error(client, "serve_start", {"model_id": "nope:fp32:cpu"})["ename"] == "ModelNotLoadedError"
    bad = error(client, "serve_start", {"model_id": model_id, "port": 70000})
    assert bad["ename"] == "InvalidRequest" and "port" in bad["evalue"]
    spaced = error(client, "serve_start", {"model_id": model_id, "port": 0, "api_key": "sk has spaces"})
    assert "apiKey" in spaced["evalue"]


def test_status_and_stop_are_answered_while_a_generate_runs(client, model_id):
    server = ok(client, "serve_start", {"model_id": model_id, "port": 0})["server"]
    long_run = client.send("generate", {"model_id": model_id, "messages": CHAT, "greedy": True, "max_tokens": 3000})
    first = client.recv()
    assert first.msg_type == "token" and first.parent_header["msg_id"] == long_run.msg_id

    for kind, content in (("serve_status", {}), ("serve_stop", {"server_id": server["server_id"]})):
        asked = client.send(kind, content)
        while True:
            msg = client.recv()
            assert msg.msg_type != "generate_reply", f"{kind} was answered only after the generate finished"
            if msg.parent_header["msg_id"] == asked.msg_id:
                assert msg.content["status"] == "ok", msg.content
                break
    assert port_is_free(server["port"])
    client.send("cancel", {"target": long_run.msg_id})
    replies = {}
    while len(replies) < 2:  # tokens still on their way come first
        msg = client.recv()
        if msg.msg_type.endswith("_reply"):
            replies[msg.msg_type] = msg.content
    assert replies["cancel_reply"]["cancelled"] is True
    assert replies["generate_reply"]["finish_reason"] == "cancelled"


def test_a_notebook_generate_runs_between_batch_steps_and_leaves_every_output_exact(client, model_id):
    prompts = [[{"role": "user", "content": f"Tell me about {topic}."}] for topic in ("rivers", "秋天的桂花")]
    n = 300
    solo = [greedy(client, model_id, p, n)["text"] for p in prompts]
    notebook_alone = greedy(client, model_id, CHAT, 24)
    server = ok(client, "serve_start", {"model_id": model_id, "port": 0, "name": "tiny"})["server"]

    flowing = [threading.Event() for _ in prompts]
    texts: list[str | None] = [None] * len(prompts)

    def stream(i: int) -> None:
        body = {"model": "tiny", "messages": prompts[i], "max_tokens": n, "temperature": 0, "stream": True}
        parts = []
        with httpx.stream("POST", server["url"] + "/chat/completions", json=body, timeout=TIMEOUT_S) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    parts.append(httpx.Response(200, content=line[6:]).json()["choices"][0]["delta"].get("content")
                                 or "")
                    flowing[i].set()
        texts[i] = "".join(parts)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    try:
        for e in flowing:
            assert e.wait(TIMEOUT_S)
        during = greedy(client, model_id, CHAT, 24)
        still_streaming = sum(t.is_alive() for t in threads)
    finally:
        for t in threads:
            t.join(TIMEOUT_S)
    assert during["text"] == notebook_alone["text"] and during["token_ids"] == notebook_alone["token_ids"]
    assert still_streaming > 0, "the notebook's generate waited for the HTTP requests to finish"
    assert texts == solo
    ok(client, "serve_stop", {"model_id": model_id})


def test_unloading_a_served_model_stops_its_server(client, model_id, tiny_model_dir):
    server = ok(client, "serve_start", {"model_id": model_id, "port": 0})["server"]
    assert ok(client, "unload", {"model_id": model_id})["unloaded"] is True
    assert ok(client, "serve_status", {})["servers"] == []
    assert port_is_free(server["port"])
    assert ok(client, "load", {"model": str(tiny_model_dir), "dtype": "fp32"})["model"]["model_id"] == model_id


def test_worker_shutdown_stops_its_servers(worker, client, model_id):
    server = ok(client, "serve_start", {"model_id": model_id, "port": 0})["server"]
    ok(client, "shutdown", {})
    assert worker.proc.wait(TIMEOUT_S) == 0
    assert port_is_free(server["port"])
    assert "stopped server" in worker.log()
