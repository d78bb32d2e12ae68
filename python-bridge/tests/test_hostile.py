"""Hostile and broken messages against a real worker: each is refused, none takes the worker down.

A dropped message gets no reply, so instead of waiting for silence each test sends a fresh `hello` right after
the bad message: the worker handles one connection's messages in order, so if the next thing that comes back
is that hello's reply, the bad message was answered with nothing.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from qwenbook_bridge import PROTOCOL_VERSION
from qwenbook_bridge.protocol import DELIMITER, Signer, make_message, now_iso, pack, parse, serialize, validate_message
from qwenbook_bridge.worker.server import CLOCK_SKEW_S, REPLAY_MAX_AGE_S
from wire import Client, WorkerProcess

LIMIT = 1024 * 1024  # a small --max-message-bytes so that oversized messages stay cheap to send
FUZZ_MESSAGES = 3000
HELLO = {"protocol_version": PROTOCOL_VERSION, "client": "pytest"}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    proc = WorkerProcess(tmp_path_factory.mktemp("hostile"), args=["--max-message-bytes", str(LIMIT)])
    yield proc
    proc.stop()


@pytest.fixture()
def client(worker):
    c = Client(worker.info)
    yield c
    c.close()


def frames_for(client: Client, msg_type: str, content: dict, **header_changes) -> list[bytes]:
    msg = make_message(msg_type, content, client.session)
    msg.header.update(header_changes)
    return serialize(msg, client.signer)


def signed(client: Client, parts: list[bytes]) -> list[bytes]:
    """Frames whose signature is right for whatever `parts` hold, so that they reach the checks after it."""
    return [DELIMITER, client.signer.sign(parts), *parts]


def next_reply_is_hello(client: Client) -> None:
    request = client.send("hello", HELLO)
    reply = client.recv()
    assert reply.parent_header["msg_id"] == request.msg_id, f"the bad message was answered: {reply.content}"
    assert reply.content["status"] == "ok"


def test_unsigned_message_is_dropped_and_logged(worker, client):
    frames = frames_for(client, "status", {})
    frames[1] = b""
    client.dealer.send_multipart(frames)
    next_reply_is_hello(client)
    assert "dropped a message with an missing signature" in worker.log()


def test_wrongly_signed_message_is_dropped(worker, client):
    frames = frames_for(client, "shutdown", {})
    frames[1] = Signer("0" * 64).sign(frames[2:6])
    client.dealer.send_multipart(frames)
    next_reply_is_hello(client)
    assert worker.proc.poll() is None


def test_a_replayed_message_is_dropped_and_logged(worker, client):
    frames = frames_for(client, "status", {})
    client.dealer.send_multipart(frames)
    first = client.recv()
    assert first.content["status"] == "ok"
    client.dealer.send_multipart(frames)
    next_reply_is_hello(client)
    # A replay from another connection (someone who captured the frames) is refused the same way.
    other = Client(worker.info)
    try:
        other.dealer.send_multipart(frames)
        next_reply_is_hello(other)
    finally:
        other.close()
    assert worker.log().count(f"dropped a replayed status {first.parent_header['msg_id']}") == 2


def _iso(offset_s: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=offset_s)).isoformat(timespec="milliseconds")


# Dates relative to now are made when the test runs, not when pytest collects it: the whole suite can take
# longer than the clock skew allowed, which would turn "150 s in the future" into the past.
@pytest.mark.parametrize("date,why", [
    (lambda: _iso(-REPLAY_MAX_AGE_S - 60), "s old, beyond the"),  # a capture replayed after its id left the window
    (lambda: _iso(CLOCK_SKEW_S + 120), "s in the future"),
    (lambda: "yesterday", "is not an ISO 8601 time"),
    (lambda: "2026-12-02T00:00:00", "is not an ISO 8601 time with a time zone"),  # no zone: whose clock?
], ids=["too old", "in the future", "not a date", "no time zone"])
def test_a_signed_message_with_a_new_id_but_a_date_outside_the_window_is_dropped(worker, client, date, why):
    date = date()
    frames = frames_for(client, "status", {}, date=date)
    msg_id = json.loads(frames[2])["msg_id"]
    client.dealer.send_multipart(frames)
    next_reply_is_hello(client)
    line = next(line for line in worker.log().splitlines() if msg_id in line)
    assert f"dropped a status {msg_id} (session {client.session}): its date {date} is" in line and why in line


def test_a_recent_date_within_the_window_is_accepted(client):
    frames = frames_for(client, "status", {}, date=_iso(-REPLAY_MAX_AGE_S / 2))
    client.dealer.send_multipart(frames)
    reply = client.recv()
    assert reply.parent_header["msg_id"] == json.loads(frames[2])["msg_id"] and reply.content["status"] == "ok"


def test_a_full_window_refuses_dates_before_its_oldest_remembered_id(monkeypatch):
    # Ids that arrived before the oldest one still remembered have been forgotten, so a message dated before
    # then could be one of them sent again, even though its date is within the age limit.
    from qwenbook_bridge.worker import server as server_module

    monkeypatch.setattr(server_module, "REPLAY_WINDOW", 3)
    srv = server_module.WorkerServer("0" * 64)
    try:
        now = time.time()
        for i, age in enumerate((100, 90, 80)):
            srv._seen[f"id{i}"] = now - age
        assert srv._date_problem(_iso(-60)) is None  # after the oldest remembered arrival
        assert "older than the oldest message the replay window still remembers" in srv._date_problem(
            _iso(-100 - CLOCK_SKEW_S - 5))
        srv._seen.popitem(last=False)  # not full: every id of the last REPLAY_MAX_AGE_S is still there
        assert srv._date_problem(_iso(-100 - CLOCK_SKEW_S - 5)) is None
    finally:
        srv.router.close(0)
        srv.pub.close(0)
        srv._pull.close(0)
        srv._ctx.term()


@pytest.mark.parametrize("broken", ["missing frames", "no delimiter", "bad json", "bad utf-8", "json too deep",
                                    "header without msg_id", "header breaking the schema", "content not an object"])
def test_truncated_and_malformed_messages_are_dropped(worker, client, broken):
    parts = [pack({"msg_id": str(uuid.uuid4()), "msg_type": "status", "session": client.session,
                   "date": now_iso(), "version": PROTOCOL_VERSION}), b"{}", b"{}", b"{}"]
    if broken == "missing frames":
        frames = signed(client, parts)[:4]
    elif broken == "no delimiter":
        frames = signed(client, parts)[1:]
    elif broken == "bad json":
        frames = signed(client, [*parts[:3], b'{"a": '])
    elif broken == "bad utf-8":
        frames = signed(client, [*parts[:3], b'{"a": "\xff"}'])
    elif broken == "json too deep":
        frames = signed(client, [*parts[:3], b"[" * 100_000 + b"]" * 100_000])
    elif broken == "header without msg_id":
        frames = signed(client, [pack({"msg_type": "status"}), *parts[1:]])
    elif broken == "header breaking the schema":
        header = {**json.loads(parts[0]), "msg_type": "s" * 65, "session": None}
        frames = signed(client, [pack(header), *parts[1:]])
    else:
        frames = signed(client, [*parts[:3], b"[]"])
    client.dealer.send_multipart(frames)
    next_reply_is_hello(client)
    assert "internal error" not in worker.log()


def test_a_message_over_the_size_limit_is_dropped_and_logged(worker, client):
    # Every frame under the limit, all of them together over it: the worker sees it and drops it.
    half = {"pad": "x" * (LIMIT // 2)}
    msg = make_message("hello", HELLO, client.session)
    parts = [pack(msg.header), pack({}), pack(half), pack({**HELLO, "client": "y" * (LIMIT // 2)})]
    client.dealer.send_multipart(signed(client, parts))
    next_reply_is_hello(client)
    assert f"over the {LIMIT}-byte limit" in worker.log()


def test_a_frame_over_the_size_limit_disconnects_the_sender_and_the_worker_carries_on(worker, client):
    msg = make_message("hello", {**HELLO, "client": "z" * (2 * LIMIT)}, client.session)
    client.dealer.send_multipart(serialize(msg, client.signer))
    other = Client(worker.info)
    try:
        next_reply_is_hello(other)
    finally:
        other.close()
    assert worker.proc.poll() is None


def test_schema_invalid_content_gets_an_error_reply(client):
    reply, _ = client.call("generate", {"model_id": 7, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.content["ename"] == "InvalidRequest" and "model_id" in reply.content["evalue"]


def _mutated_content(rng: random.Random) -> dict:
    """Random JSON for a request: sometimes close to valid, so that validation and the handlers see it."""
    values = [None, True, -1, 0, 2**70, 1.5, "", "x" * rng.randint(1, 300), [], {}, [1, "a"], {"a": {"b": []}},
              "../../etc/passwd", "\u0000", "\ud7ff"]
    content: dict = {}
    for _ in range(rng.randint(0, 5)):
        key = rng.choice(["model", "model_id", "prompt", "messages", "target", "protocol_version", "client",
                          "max_new_tokens", "dtype", "path", "x", ""])
        content[key] = rng.choice(values)
    return content


# Types a fuzzed message may take once re-signed. Not shutdown (it would be obeyed), nor the requests that
# write files or open ports: those are covered by their own tests, and a random one could succeed.
_FUZZ_TYPES = ["hello", "status", "cancel", "generate", "load", "unload", "adapter_list", "train_preview",
               "serve_status", "frobnicate", ""]


def _mutate(rng: random.Random, client: Client, base: list[bytes]) -> list[bytes]:
    frames = list(base)
    kind = rng.randrange(6)
    if kind == 0:  # drop frames
        for _ in range(rng.randint(1, 3)):
            if frames:
                frames.pop(rng.randrange(len(frames)))
    elif kind == 1:  # flip bytes in one frame
        i = rng.randrange(len(frames))
        data = bytearray(frames[i] or b"\0")
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        frames[i] = bytes(data)
    elif kind == 2:  # truncate one frame
        i = rng.randrange(len(frames))
        frames[i] = frames[i][:rng.randrange(len(frames[i]) + 1)]
    elif kind == 3:  # duplicate or append junk frames
        frames.insert(rng.randrange(len(frames) + 1), rng.choice([DELIMITER, b"", b"{}", rng.randbytes(20)]))
    else:  # re-signed mutated JSON: reaches parsing, the replay window and validation
        header = {"msg_id": str(uuid.uuid4()), "msg_type": rng.choice(_FUZZ_TYPES), "session": client.session,
                  "date": now_iso(), "version": PROTOCOL_VERSION}
        if rng.random() < 0.2:
            header[rng.choice(list(header))] = rng.choice([None, 5, [], "", "x" * 200])
        parts = [json.dumps(header).encode(), b"{}", b"{}", json.dumps(_mutated_content(rng)).encode()]
        if kind == 5:
            i = rng.randrange(4)
            parts[i] = parts[i][:rng.randrange(len(parts[i]) + 1)]
        frames = signed(client, parts)
    return frames


def test_fuzzed_messages_leave_the_worker_serving(worker, client):
    rng = random.Random(10)
    templates = [frames_for(client, t, c) for t, c in (
        ("hello", HELLO), ("status", {}), ("cancel", {"target": "nothing"}),
        ("generate", {"model_id": "nope", "prompt": "hi"}))]
    replies = rejected = 0
    for _ in range(FUZZ_MESSAGES):
        client.dealer.send_multipart(_mutate(rng, client, rng.choice(templates)))
        while client.dealer.poll(0):
            reply = parse(client.dealer.recv_multipart(), client.signer)
            validate_message(reply)  # even a reply to a fuzzed request must be one the kernel accepts
            replies += 1
            rejected += reply.content.get("ename") in ("InvalidRequest", "UnknownMessageType")
    request = client.send("hello", HELLO)
    while True:  # replies to fuzzed messages that reached a handler may still be ahead of this one
        reply = parse(client.dealer.recv_multipart(), client.signer) if client.dealer.poll(120_000) else None
        assert reply is not None, "the worker stopped answering"
        validate_message(reply)
        if reply.parent_header.get("msg_id") == request.msg_id:
            break
        replies += 1
        rejected += reply.content.get("ename") in ("InvalidRequest", "UnknownMessageType")
    assert reply.content["status"] == "ok" and worker.proc.poll() is None
    status, _ = client.call("status", {})
    assert status.content["status"] == "ok"
    # Most mutations break the signature or the envelope and are dropped; some reach validation and are refused.
    assert 0 < rejected <= replies < FUZZ_MESSAGES // 2
    assert "internal error" not in worker.log()
