"""The wire protocol: envelopes, HMAC signing and schema validation, with no sockets.

Frames follow Jupyter's wire protocol: [identities..., b"<IDS|MSG>", signature, header, parent_header,
metadata, content]. The signature is hex HMAC-SHA256 over the four JSON frames, keyed with the ASCII of the
hex key from the runtime file. schema/protocol.json is the one definition of every message's content.
"""

from __future__ import annotations

import hmac
import json
import math
import sys
import traceback as tb
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable

# jsonschema imports rfc3987_syntax where it is installed (JupyterLab's jupyter_events brings it), and that module
# builds a Lark grammar at import: 1 s of every worker start on an idle machine, 4 s on a busy one. It only serves
# the "iri" format check, which this schema never asks for (and the validator checks no formats), so it is kept
# out while jsonschema loads; a later import of it elsewhere in the process works as usual.
_SKIP_IRI = "rfc3987_syntax" not in sys.modules
if _SKIP_IRI:
    sys.modules["rfc3987_syntax"] = None  # type: ignore[assignment]  # None in sys.modules: ImportError
try:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import ValidationError, best_match
finally:
    if _SKIP_IRI:
        del sys.modules["rfc3987_syntax"]

DELIMITER = b"<IDS|MSG>"
SCHEMA_PATH = Path(__file__).parent / "schema" / "protocol.json"
SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
PROTOCOL_VERSION: str = SCHEMA["x-protocol-version"]
REQUESTS: dict[str, dict[str, Any]] = SCHEMA["x-requests"]
EVENTS: dict[str, str] = SCHEMA["x-events"]
BROADCASTS: dict[str, str] = SCHEMA["x-broadcasts"]


class SignatureError(ValueError):
    """Missing or wrong HMAC: the sender does not hold the key."""


class MalformedMessageError(ValueError):
    """Correctly signed, but not a well-formed envelope (no delimiter, bad JSON, header fields missing)."""


class InvalidContentError(ValueError):
    """Content that does not match the schema; the message names the field and the rule."""

    def __init__(self, message: str, field_path: str) -> None:
        super().__init__(message)
        self.field_path = field_path


def pack(obj: Any) -> bytes:
    """Compact UTF-8 JSON; NaN/Infinity are refused because JSON.parse on the other side would reject them."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def unpack(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"))


class Signer:
    def __init__(self, key: str | bytes) -> None:
        self._key = key.encode("ascii") if isinstance(key, str) else key
        self._base = hmac.new(self._key, digestmod=sha256)

    def sign(self, parts: list[bytes]) -> bytes:
        h = self._base.copy()
        for part in parts:
            h.update(part)
        return h.hexdigest().encode("ascii")

    def verify(self, signature: bytes, parts: list[bytes]) -> bool:
        return hmac.compare_digest(self.sign(parts), signature)


def now_iso() -> str:
    """ISO 8601 in UTC with milliseconds, as JavaScript's Date.toISOString writes it."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_header(msg_type: str, session: str) -> dict[str, str]:
    return {"msg_id": str(uuid.uuid4()), "msg_type": msg_type, "session": session, "date": now_iso(),
            "version": PROTOCOL_VERSION}


@dataclass
class Message:
    header: dict[str, Any]
    content: dict[str, Any]
    parent_header: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    identities: list[bytes] = field(default_factory=list)

    @property
    def msg_id(self) -> str:
        return self.header["msg_id"]

    @property
    def msg_type(self) -> str:
        return self.header["msg_type"]

    @property
    def session(self) -> str:
        return self.header.get("session", "")


def make_message(msg_type: str, content: dict[str, Any], session: str, parent: Message | None = None,
                 identities: list[bytes] | None = None) -> Message:
    """A new message; with `parent`, it answers that request (parent_header, and routed back to its sender)."""
    return Message(header=new_header(msg_type, session), content=content,
                   parent_header=dict(parent.header) if parent else {},
                   identities=list(identities if identities is not None else (parent.identities if parent else [])))


def serialize(msg: Message, signer: Signer) -> list[bytes]:
    """Frames ready for a ROUTER/DEALER socket, identities first."""
    parts = [pack(msg.header), pack(msg.parent_header), pack(msg.metadata), pack(msg.content)]
    return [*msg.identities, DELIMITER, signer.sign(parts), *parts]


def parse(frames: list[bytes], signer: Signer) -> Message:
    """Check the signature before anything else is trusted, then decode the envelope."""
    try:
        at = frames.index(DELIMITER)
    except ValueError:
        raise MalformedMessageError(f"no {DELIMITER.decode()} delimiter among {len(frames)} frames") from None
    identities, rest = frames[:at], frames[at + 1:]
    if len(rest) < 5:
        raise MalformedMessageError(f"expected signature + 4 JSON frames after the delimiter, got {len(rest)} frames")
    signature, parts = rest[0], rest[1:5]
    if not signature or not signer.verify(signature, parts):
        raise SignatureError("missing signature" if not signature else "invalid signature")
    try:
        header, parent, metadata, content = (unpack(p) for p in parts)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deeply
        raise MalformedMessageError(f"a frame is not UTF-8 JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict) or not all(isinstance(header.get(k), str) for k in ("msg_id", "msg_type")):
        raise MalformedMessageError("header must be an object with string msg_id and msg_type")
    for name, value in (("parent_header", parent), ("metadata", metadata), ("content", content)):
        if not isinstance(value, dict):
            raise MalformedMessageError(f"{name} must be a JSON object, got {type(value).__name__}")
    return Message(header, content, parent, metadata, identities)


def reply_type(request_type: str) -> str:
    return f"{request_type}_reply"


def error_content(ename: str, evalue: str, traceback: list[str] | None = None) -> dict[str, Any]:
    return {"status": "error", "ename": ename, "evalue": evalue, "traceback": list(traceback or [])}


def exception_content(exc: BaseException) -> dict[str, Any]:
    lines = "".join(tb.format_exception(type(exc), exc, exc.__traceback__)).splitlines()
    return error_content(type(exc).__name__, str(exc) or type(exc).__name__, lines)


def major(version: str) -> int | None:
    head = str(version).split(".", 1)[0]
    return int(head) if head.isdigit() else None


# ---------------------------------------------------------------- validation


@lru_cache(maxsize=None)
def _validator(def_name: str) -> Draft202012Validator:
    if def_name not in SCHEMA["$defs"]:
        raise KeyError(f"protocol.json has no $defs/{def_name}")
    schema = {"$schema": SCHEMA["$schema"], "$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{def_name}"}
    return Draft202012Validator(schema)


def _field(error: ValidationError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return path.lstrip(".")


def _describe(error: ValidationError) -> tuple[str, str]:
    """The offending field and one readable sentence: what it must be and what it was."""
    name = _field(error)
    v, expected, got = error.validator, error.validator_value, error.instance
    prefix = f"{name}." if name else ""
    if v == "required":
        missing = next((k for k in expected if isinstance(got, dict) and k not in got), "?")
        return prefix + missing, f"{prefix}{missing} is required"
    if v == "additionalProperties" and isinstance(got, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(k for k in got if k not in allowed)
        known = ", ".join(sorted(allowed)) or "none"
        return prefix + (extra[0] if extra else ""), \
            f"unknown field(s) {', '.join(prefix + k for k in extra)} (allowed: {known})"
    subject = name or "content"
    rules: dict[str, Callable[[Any], str]] = {
        "minimum": lambda x: f"must be at least {x}",
        "maximum": lambda x: f"must be at most {x}",
        "exclusiveMinimum": lambda x: f"must be greater than {x}",
        "exclusiveMaximum": lambda x: f"must be less than {x}",
        "type": lambda x: f"must be of type {x}",
        "enum": lambda x: "must be one of " + ", ".join(json.dumps(e) for e in x),
        "const": lambda x: f"must be {json.dumps(x)}",
        "minLength": lambda x: f"must be at least {x} character(s) long",
        "maxLength": lambda x: f"must be at most {x} characters long",
        "minItems": lambda x: f"must have at least {x} item(s)",
        "maxItems": lambda x: f"must have at most {x} items",
        "pattern": lambda x: f"must match {x}",
    }
    if v not in rules:
        return name, f"{subject}: {error.message}"
    return name, f"{subject} {rules[v](expected)}, got {json.dumps(got, ensure_ascii=False)[:80]}"


def check(def_name: str, instance: Any, what: str) -> None:
    """Raise InvalidContentError (naming the field) unless `instance` matches $defs/`def_name`."""
    error = best_match(_validator(def_name).iter_errors(instance))
    if error is not None:
        field_path, sentence = _describe(error)
        raise InvalidContentError(f"{what}: {sentence}", field_path)


def validate_request(msg_type: str, content: Any) -> None:
    check(REQUESTS[msg_type]["request"], content, f"invalid {msg_type} request")


def content_def(msg_type: str, content: Any = None) -> str:
    """The $defs entry any message type's content must match (requests, replies, events, broadcasts)."""
    if msg_type in REQUESTS:
        return REQUESTS[msg_type]["request"]
    if msg_type.endswith("_reply"):
        if isinstance(content, dict) and content.get("status") == "error":
            return "ErrorReply"  # also what an unknown request type is answered with
        if msg_type[:-6] in REQUESTS:
            return REQUESTS[msg_type[:-6]]["reply"]
    if msg_type in EVENTS:
        return EVENTS[msg_type]
    if msg_type in BROADCASTS:
        return BROADCASTS[msg_type]
    raise KeyError(f"{msg_type!r} is not a message type in protocol.json")


def validate_message(msg: Message) -> None:
    """Check a whole message: its header and its content against the schema (used by conformance tests)."""
    check("Header", msg.header, f"{msg.header.get('msg_type', '?')} header")
    if msg.parent_header:
        check("Header", msg.parent_header, f"{msg.msg_type} parent_header")
    check(content_def(msg.msg_type, msg.content), msg.content, msg.msg_type)


def json_clean(value: Any) -> Any:
    """Event and reply content as the schema has it: no None fields, tuples as lists, no NaN/Infinity (which
    JSON cannot carry; a non-finite number is left out like a missing one)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            v = json_clean(v)
            if v is not None:
                out[k] = v
        return out
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
