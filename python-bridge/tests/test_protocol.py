from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from datetime import datetime

import pytest
from jsonschema import Draft202012Validator

from qwenbook_bridge import PROTOCOL_VERSION
from qwenbook_bridge.protocol import (BROADCASTS, DELIMITER, EVENTS, REQUESTS, SCHEMA, InvalidContentError,
    MalformedMessageError, Message, SignatureError, Signer, content_def, error_content, exception_content,
    make_message, pack, parse, serialize, validate_message, validate_request)

KEY = "ab" * 32


def test_schema_is_valid_and_every_declared_type_has_a_definition():
    Draft202012Validator.check_schema(SCHEMA)
    defs = SCHEMA["$defs"]
    assert SCHEMA["x-protocol-version"] == PROTOCOL_VERSION
    for name, entry in REQUESTS.items():
        assert entry["request"] in defs and entry["reply"] in defs, name
        assert all(event in EVENTS for event in entry["events"]), name
    assert all(d in defs for d in [*EVENTS.values(), *BROADCASTS.values()])


def test_signature_is_hmac_sha256_over_the_four_frames_keyed_with_the_hex_string():
    parts = [b'{"a":1}', b"{}", b"{}", '{"t":"你好"}'.encode()]
    expected = hmac.new(KEY.encode("ascii"), b"".join(parts), hashlib.sha256).hexdigest().encode()
    signer = Signer(KEY)
    assert signer.sign(parts) == expected
    assert signer.verify(expected, parts)
    assert not signer.verify(expected, [*parts[:3], b'{"t":"x"}'])
    assert not Signer("cd" * 32).verify(expected, parts)


def test_frames_are_compact_utf8_json():
    assert pack({"text": "你好", "n": [1, 2]}) == '{"text":"你好","n":[1,2]}'.encode()
    with pytest.raises(ValueError):
        pack({"x": float("nan")})


def test_serialize_then_parse_round_trips_with_identities():
    signer = Signer(KEY)
    request = make_message("status", {}, session="s1")
    request.identities = [b"peer"]
    reply = make_message("status_reply", {"status": "ok"}, session="w", parent=request)
    frames = serialize(reply, signer)
    assert frames[0] == b"peer" and frames[1] == DELIMITER
    back = parse(frames, signer)
    assert back.identities == [b"peer"]
    assert back.parent_header == request.header
    assert back.content == {"status": "ok"}
    assert back.msg_type == "status_reply"


def test_header_has_the_fields_the_schema_asks_for():
    msg = make_message("hello", {"protocol_version": "1.0", "client": "t"}, session="abc")
    uuid.UUID(msg.header["msg_id"])
    assert msg.header["version"] == PROTOCOL_VERSION and msg.header["session"] == "abc"
    assert msg.header["date"].endswith("Z")
    datetime.fromisoformat(msg.header["date"].replace("Z", "+00:00"))
    validate_message(msg)


def test_parse_refuses_bad_signatures_and_malformed_envelopes():
    signer = Signer(KEY)
    frames = serialize(make_message("status", {}, "s"), signer)
    with pytest.raises(SignatureError):
        parse(frames, Signer("cd" * 32))
    with pytest.raises(SignatureError):
        parse([frames[0], b"", *frames[2:]], signer)
    with pytest.raises(MalformedMessageError):
        parse(frames[1:], signer)  # no delimiter
    with pytest.raises(MalformedMessageError):
        parse(frames[:4], signer)  # frames missing
    parts = [b"not json", b"{}", b"{}", b"{}"]
    with pytest.raises(MalformedMessageError):
        parse([DELIMITER, signer.sign(parts), *parts], signer)
    parts = [pack({"msg_id": "1", "msg_type": "status"}), b"{}", b"{}", b"[]"]
    with pytest.raises(MalformedMessageError, match="content must be a JSON object"):
        parse([DELIMITER, signer.sign(parts), *parts], signer)


@pytest.mark.parametrize("content, field, words", [
    ({"model_id": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     "max_tokens", "max_tokens must be at least 1, got 0"),
    ({"model_id": "m", "messages": []}, "messages", "messages must have at least 1 item"),
    ({"model_id": "m", "messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role", "must be one of"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model_id", "model_id is required"),
    ({"model_id": "m", "messages": [{"role": "user", "content": "hi"}], "maxTokens": 5}, "maxTokens",
     "unknown field(s) maxTokens"),
    ({"model_id": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature",
     "temperature must be of type number"),
])
def test_invalid_requests_name_the_field(content, field, words):
    with pytest.raises(InvalidContentError) as info:
        validate_request("generate", content)
    assert info.value.field_path == field
    assert words in str(info.value)


def test_valid_requests_pass():
    validate_request("generate", {"model_id": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["\n"]})
    validate_request("load", {"model": "Qwen/Qwen2.5-7B-Instruct", "dtype": "bf16"})
    validate_request("status", {})


def test_error_replies_validate_for_any_request_type():
    content = error_content("UnknownMessageType", "no such request")
    assert content_def("frobnicate_reply", content) == "ErrorReply"
    validate_message(Message(header=make_message("frobnicate_reply", content, "s").header, content=content))
    with pytest.raises(KeyError):
        content_def("frobnicate_reply", {"status": "ok"})


def test_exception_content_carries_class_message_and_traceback():
    try:
        raise ValueError("maxTokens must be at least 1, got 0")
    except ValueError as e:
        content = exception_content(e)
    assert content["ename"] == "ValueError"
    assert content["evalue"] == "maxTokens must be at least 1, got 0"
    assert content["traceback"][0].startswith("Traceback") and "test_protocol.py" in "".join(content["traceback"])
    json.dumps(content)
