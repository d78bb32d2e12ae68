"""The OpenAI server's limits against overload and slow clients, on the tiny model: body size (413), the
queue (429 with Retry-After), slow headers, trickling bodies (408) and streams nobody reads.

Raw sockets stand in for misbehaving clients; each waits for the server's answer with a generous
deadline, so a server that never answers fails the test instead of hanging it."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from qwenbook_bridge.engine.errors import InvalidOptionError
from qwenbook_bridge.openai.server import OpenAIServer, ServeConfig
from qwenbook_bridge.openai.routes import ApiLimits, OpenAIApi

NAME = "tiny-limits"
BODY_LIMIT = 64 * 1024
CLIENT_TIMEOUT_S = 2.0  # short so the slow-client tests finish quickly; the tests wait far longer than this
DEADLINE_S = 120.0  # how long a test waits for the server to answer before calling it a hang
CHAT = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def server(tiny):
    srv = OpenAIServer.for_loaded(tiny, ServeConfig(port=0, model_name=NAME, max_batch_size=2, max_queue=1,
                                                    max_body_bytes=BODY_LIMIT, client_timeout_s=CLIENT_TIMEOUT_S))
    srv.start()
    yield srv
    srv.stop()


def connect(server, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:  # before connect, so the advertised window is small too
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(DEADLINE_S)
    sock.connect(("127.0.0.1", server.port))
    return sock


def head(path: str, *lines: str) -> bytes:
    return (f"POST /v1{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{h}\r\n" for h in lines) + "\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """One HTTP response with a Content-Length body, read until complete or the server closes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without answering: {data!r}"
        data += chunk
    header, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = header.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    while len(rest) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection in the middle of its answer"
        rest += chunk
    return int(status_line.split()[1]), headers, json.loads(rest)


def closed_by_server(sock: socket.socket) -> bool:
    """Reads until the server closes the connection (True) or the deadline passes (False)."""
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def openai_error(body: dict, code: str) -> str:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code, body
    return body["error"]["message"]


def chat_body(max_tokens: int = 4, **extra) -> dict:
    return {"model": NAME, "messages": CHAT, "max_tokens": max_tokens, "temperature": 0, **extra}


# ---- request bodies --------------------------------------------------------------------------------

def test_a_declared_oversized_body_is_refused_before_it_is_sent(server):
    with connect(server) as sock:
        sock.sendall(head("/chat/completions", "Content-Type: application/json",
                          f"Content-Length: {10 * BODY_LIMIT}"))
        status, _, body = read_response(sock)  # answered from the headers: no body byte was sent
    assert status == 413
    message = openai_error(body, "request_too_large")
    assert f"{10 * BODY_LIMIT} bytes" in message and str(BODY_LIMIT) in message


def test_an_ordinary_client_sending_too_much_gets_the_413(server):
    # httpx sends the whole body before it reads: the server drops the rest instead of resetting the connection.
    big = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * (4 * BODY_LIMIT)}])).encode()
    r = httpx.post(server.url + "/chat/completions", content=big, headers={"Content-Type": "application/json"},
                   timeout=DEADLINE_S)
    assert r.status_code == 413
    openai_error(r.json(), "request_too_large")
    # The server still serves.
    ok = httpx.post(server.url + "/chat/completions", json=chat_body(), timeout=DEADLINE_S)
    assert ok.status_code == 200, ok.text


def test_an_endless_chunked_body_is_cut_off_at_the_limit(server):
    """No Content-Length at all: the limit applies to what arrives, so an endless body ends in a 413."""
    chunk = b"%x\r\n%s\r\n" % (4096, b"x" * 4096)
    sent = 0
    with connect(server) as sock:
        sock.sendall(head("/chat/completions", "Content-Type: application/json", "Transfer-Encoding: chunked"))
        sock.setblocking(False)
        answer = b""
        # Far more than the limit plus every buffer on the way: a server reading it all would still be reading.
        while sent < 256 * BODY_LIMIT:
            try:
                answer += sock.recv(65536)
                break
            except BlockingIOError:
                pass
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(DEADLINE_S)
        assert answer or sent < 256 * BODY_LIMIT, "the server kept reading an endless body"
        while b"\r\n\r\n" not in answer:
            more = sock.recv(65536)
            assert more, answer
            answer += more
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


def test_a_body_shorter_than_its_content_length_gets_a_408(server):
    payload = json.dumps(chat_body()).encode()
    with connect(server) as sock:
        sock.sendall(head("/chat/completions", "Content-Type: application/json",
                          f"Content-Length: {len(payload) + 100}") + payload)
        status, headers, body = read_response(sock)
        assert status == 408 and headers.get("connection") == "close"
        assert "did not arrive within" in openai_error(body, "request_timeout")
        assert closed_by_server(sock)


def test_a_trickling_body_is_cut_off(server):
    payload = json.dumps(chat_body()).encode()
    with connect(server) as sock:
        sock.sendall(head("/chat/completions", "Content-Type: application/json", f"Content-Length: {len(payload)}"))
        sock.settimeout(0.2)
        answer = b""
        for byte in payload:  # one byte per 0.2 s: the whole body would take minutes
            try:
                sock.sendall(bytes([byte]))
                answer = sock.recv(65536)
                break
            except TimeoutError:
                continue
        sock.settimeout(DEADLINE_S)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]


# ---- slow headers ------------------------------------------------------------------------------------

def test_headers_that_trickle_or_never_come_are_cut_off(server):
    with connect(server) as idle:
        assert closed_by_server(idle), "a connection that sent nothing was kept open"
    with connect(server) as slow:
        slow.settimeout(0.2)
        gone = False
        request = head("/chat/completions", "Content-Type: application/json", "Content-Length: 10") * 50
        deadline = time.monotonic() + DEADLINE_S
        for byte in request:  # slowloris: one header byte at a time, never finishing in time
            if time.monotonic() > deadline:
                break
            try:
                slow.sendall(bytes([byte]))
                if slow.recv(65536) == b"":
                    gone = True
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                gone = True
                break
        assert gone, "a client sending its headers one byte at a time was never cut off"


def test_keep_alive_still_works_within_the_timeouts(server):
    with httpx.Client(timeout=DEADLINE_S) as c:
        for _ in range(3):
            assert c.post(server.url + "/chat/completions", json=chat_body()).status_code == 200


# ---- the queue -----------------------------------------------------------------------------------------

def test_a_full_queue_answers_429_with_retry_after(server):
    """Two rows and one queue place: a fourth request while three are in is turned away."""
    results: list[httpx.Response] = []

    def one() -> None:
        results.append(httpx.post(server.url + "/chat/completions", json=chat_body(6), timeout=DEADLINE_S))

    rejected_before = server.stats().requests_rejected
    # With the scheduler parked (as the notebook's generate parks it) nothing leaves the queue.
    with server.scheduler.exclusive():
        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + DEADLINE_S
        while server.scheduler.stats().waiting < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.scheduler.stats().waiting == 3
        busy = httpx.post(server.url + "/chat/completions", json=chat_body(), timeout=DEADLINE_S)
    for t in threads:
        t.join(DEADLINE_S)
    assert busy.status_code == 429
    after = int(busy.headers["retry-after"])
    assert 1 <= after <= 60
    message = openai_error(busy.json(), "rate_limit_exceeded")
    assert busy.json()["error"]["type"] == "requests" and f"retry after {after} s" in message
    assert [r.status_code for r in results] == [200, 200, 200]
    assert server.stats().requests_rejected == rejected_before + 1
    # Once the queue has drained, requests are accepted again.
    assert httpx.post(server.url + "/chat/completions", json=chat_body(), timeout=DEADLINE_S).status_code == 200


def test_retry_after_can_be_fixed(server, tiny):
    api = OpenAIApi(server.scheduler, tiny.tokenizer, None, NAME, limits=ApiLimits(retry_after_s=7))
    assert api.retry_after() == 7


# ---- a stream nobody reads -------------------------------------------------------------------------------

@pytest.fixture
def long_server(tiny):
    """A context long enough that a reply could not finish within the stall timeout even on a fast machine:
    the reply that fills every buffer on the way is a small part of it."""
    srv = OpenAIServer.for_loaded(tiny, ServeConfig(port=0, model_name=NAME, context_length=16384,
                                                    client_timeout_s=CLIENT_TIMEOUT_S))
    srv.start()
    yield srv
    srv.stop()


def test_a_stream_whose_reader_stalls_is_cancelled_and_does_not_hold_the_batch(long_server):
    server = long_server
    budget = server.scheduler.context_length - 64
    before = server.scheduler.stats().tokens_generated
    body = json.dumps(chat_body(budget, stream=True, ignore_eos=True)).encode()
    with connect(server, rcvbuf=4096) as stalled:
        stalled.sendall(head("/chat/completions", "Content-Type: application/json",
                             f"Content-Length: {len(body)}") + body)
        # Never read. The server must give up on this stream; meanwhile others are served.
        ok = httpx.post(server.url + "/chat/completions", json=chat_body(8), timeout=DEADLINE_S)
        assert ok.status_code == 200
        deadline = time.monotonic() + DEADLINE_S
        while server.stats().requests_active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.stats().requests_active == 0
    # Had the stalled stream run to its end it would have produced `budget` tokens on its own.
    assert server.scheduler.stats().tokens_generated - before < budget


# ---- options -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value", "words"), [
    ("max_queue", -1, "maxQueue must be an integer from 0"),
    ("max_queue", 1.5, "maxQueue must be an integer"),
    ("max_body_bytes", 10, "maxBody must be an integer from 1024"),
    ("retry_after_s", 0, "retryAfter must be an integer from 1 to 3600"),
    ("client_timeout_s", 0, "clientTimeout must be a number of seconds"),
])
def test_bad_limits_are_refused_with_a_clear_message(field, value, words):
    with pytest.raises(InvalidOptionError, match=words):
        ServeConfig(**{field: value}).validate()


def test_the_queue_defaults_to_four_requests_per_batch_row():
    assert ServeConfig(max_batch_size=8).queue_limit == 32
    assert ServeConfig(max_batch_size=8, max_queue=0).queue_limit == 0


# ---- qwenbook serve ------------------------------------------------------------------------------------------

def test_serve_cli_sizes_read_like_nginx():
    from qwenbook_bridge.openai.cli import byte_size

    assert [byte_size(t) for t in ("4194304", "4MiB", "4m", "512 KiB", "1MB")] == [4 * 2**20] * 3 + [2**19, 10**6]
    with pytest.raises(Exception, match="is not a size"):
        byte_size("4 parsecs")


def test_serve_cli_refuses_bad_limits_before_loading_the_model(tmp_path):
    import subprocess
    import sys

    # The CLI's own main, then whether it imported torch: the options are refused before torch's seconds of import.
    run_cli = ("import sys; from qwenbook_bridge.openai.cli import main; code = main(sys.argv[1:]); "
               "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", run_cli, str(tmp_path / "no-model"), "--max-queue", "-1"],
                         capture_output=True, text=True, timeout=DEADLINE_S)
    assert out.returncode == 2
    assert "maxQueue must be an integer from 0" in out.stderr and "[" not in out.stderr.split("error:")[0], out.stderr
    assert out.stdout.strip() == "no torch"


def test_serve_cli_applies_its_limits(tiny_model_dir):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "qwenbook_bridge.openai.cli", str(tiny_model_dir), "--port", "0",
                             "--device", "cpu", "--name", NAME, "--max-body", "2KiB", "--max-queue", "0",
                             "--client-timeout", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"Serving {NAME} at http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        big = chat_body(messages=[{"role": "user", "content": "x" * 4096}])
        r = httpx.post(url + "/chat/completions", json=big, timeout=DEADLINE_S)
        assert r.status_code == 413 and "at most 2048 bytes" in openai_error(r.json(), "request_too_large")
        assert httpx.post(url + "/chat/completions", json=chat_body(), timeout=DEADLINE_S).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
