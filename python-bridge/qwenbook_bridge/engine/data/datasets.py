"""Fine-tuning datasets: read alpaca / sharegpt rows from a file or from memory, validate them, and mix sources.

Every problem with a row is reported as `<file>, row <n>, field "<name>": <what is wrong>` so a user can open the
file at that row. Turning conversations into token ids and masked labels lives in `chat_encoding.py`.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qwenbook_bridge.engine.errors import EngineError
from qwenbook_bridge.engine.data.self_cognition import SelfCognition

Format = Literal["auto", "alpaca", "sharegpt"]
FORMATS: tuple[str, ...] = ("auto", "alpaca", "sharegpt")

_USER_ROLES = {"human": "user", "user": "user"}
_ASSISTANT_ROLES = {"gpt": "assistant", "assistant": "assistant", "model": "assistant"}
_SYSTEM_ROLES = {"system": "system"}


class DatasetError(EngineError, ValueError):
    """A dataset source or one of its rows cannot be used. `file`, `row` (1-based) and `field` say where."""

    def __init__(self, message: str, *, file: str, row: int | None = None, field: str | None = None) -> None:
        where = file
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field \"{field}\""
        super().__init__(f"{where}: {message}")
        self.reason, self.file, self.row, self.field = message, file, row, field


@dataclass
class DatasetSpec:
    """One source of training rows and how many samples to draw from it.

    `source` is a path to a .json (a list of rows) or .jsonl (one row per line) file, a list of row dicts, or a
    `SelfCognition`. `samples` draws that many rows (seeded); more than the source holds cycles through it.
    """

    source: str | os.PathLike[str] | Sequence[Mapping[str, Any]] | SelfCognition
    format: Format = "auto"
    samples: int | None = None
    name: str | None = None

    def label(self) -> str:
        if self.name:
            return self.name
        if isinstance(self.source, SelfCognition):
            return self.source.describe()
        if isinstance(self.source, (str, os.PathLike)):
            return str(self.source)
        return "<rows>"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetSpec:
        """Build from a wire-style dict: exactly one of `path`, `rows`, `self_cognition` ({name, author, ...})."""
        keys = {"path", "rows", "self_cognition", "format", "samples", "name"}
        unknown = sorted(set(d) - keys)
        if unknown:
            raise DatasetError(f"unknown option(s) {unknown}; expected some of {sorted(keys)}", file="<dataset spec>")
        given = [k for k in ("path", "rows", "self_cognition") if d.get(k) is not None]
        if len(given) != 1:
            raise DatasetError("give exactly one of path, rows or self_cognition", file="<dataset spec>")
        src: Any = d[given[0]]
        if given[0] == "self_cognition":
            if not isinstance(src, Mapping):
                raise DatasetError("self_cognition must be {name, author}", file="<dataset spec>")
            try:
                src = SelfCognition(**src)
            except (TypeError, ValueError) as e:
                raise DatasetError(str(e), file="<dataset spec>", field="self_cognition") from None
        return cls(source=src, format=d.get("format", "auto"), samples=d.get("samples"), name=d.get("name"))


@dataclass
class Conversation:
    """Chat messages [{role, content}] ready for the chat template; `source`/`row` say where they came from."""

    messages: list[dict[str, str]]
    source: str
    row: int


@dataclass
class SourceStats:
    name: str
    format: str
    rows: int
    samples: int


@dataclass
class MixedConversations:
    conversations: list[Conversation]
    sources: list[SourceStats]
    notes: list[str] = field(default_factory=list)
    # The same conversations grouped by source, in spec order.
    by_source: list[list[Conversation]] = field(default_factory=list)


def read_rows(path: str | os.PathLike[str]) -> list[tuple[int, Any]]:
    """(row number, value) pairs from a JSON list or a JSONL file; row numbers are 1-based (JSONL: line numbers)."""
    p = Path(path)
    name = str(path)
    if not p.exists():
        hint = "" if p.is_absolute() else \
            f"; relative paths are resolved from the worker's working directory {os.getcwd()}"
        raise DatasetError(f"file not found (check the path{hint})", file=name)
    if p.is_dir():
        raise DatasetError("is a folder; give a .json or .jsonl file", file=name)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"is not UTF-8 text ({e.reason} at byte {e.start})", file=name) from None
    if not text.strip():
        raise DatasetError("is empty", file=name)
    if p.suffix.lower() != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            # A .json file holding one object per line is common enough to accept.
            if e.msg == "Extra data" and text.lstrip().startswith("{"):
                return _read_jsonl(text, name)
            raise DatasetError(f"is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}", file=name) from None
        if isinstance(data, Mapping):
            raise DatasetError("holds a JSON object; expected a list of rows ([{...}, {...}]) or JSONL", file=name)
        if not isinstance(data, list):
            raise DatasetError(f"holds a JSON {type(data).__name__}; expected a list of rows", file=name)
        if not data:
            raise DatasetError("holds an empty list", file=name)
        return [(i + 1, row) for i, row in enumerate(data)]
    return _read_jsonl(text, name)


def _read_jsonl(text: str, name: str) -> list[tuple[int, Any]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DatasetError(f"line {lineno} is not valid JSON: {e.msg} at column {e.colno}", file=name,
                               row=lineno) from None
    if not rows:
        raise DatasetError("is empty", file=name)
    return rows


def detect_format(row: Any, file: str, rownum: int) -> str:
    if isinstance(row, Mapping):
        if "conversations" in row or "messages" in row:
            return "sharegpt"
        if "instruction" in row or "output" in row:
            return "alpaca"
    raise DatasetError("cannot tell the format: alpaca rows have \"instruction\" and \"output\", sharegpt rows have "
                       "\"conversations\"; pass format explicitly", file=file, row=rownum)


def _text(row: Mapping[str, Any], key: str, file: str, rownum: int, *, required: bool) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise DatasetError("is missing", file=file, row=rownum, field=key)
        return None
    value = row[key]
    if not isinstance(value, str):
        raise DatasetError(f"must be a string, got {type(value).__name__}", file=file, row=rownum, field=key)
    return value


def alpaca_to_messages(row: Any, file: str, rownum: int) -> list[dict[str, str]]:
    """{instruction, input?, output, system?, history?: [[question, answer], ...]} -> chat messages."""
    if not isinstance(row, Mapping):
        raise DatasetError(f"must be an object, got {type(row).__name__}", file=file, row=rownum)
    instruction = _text(row, "instruction", file, rownum, required=True)
    output = _text(row, "output", file, rownum, required=True)
    extra = _text(row, "input", file, rownum, required=False)
    system = _text(row, "system", file, rownum, required=False)
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    history = row.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise DatasetError("must be a list of [question, answer] pairs", file=file, row=rownum, field="history")
        for i, pair in enumerate(history):
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                    or not all(isinstance(x, str) for x in pair)):
                raise DatasetError("must be a [question, answer] pair of strings", file=file, row=rownum,
                                   field=f"history[{i}]")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = f"{instruction}\n{extra}" if extra else instruction
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return messages


def sharegpt_to_messages(row: Any, file: str, rownum: int) -> list[dict[str, str]]:
    """{conversations: [{from, value}] or [{role, content}], system?} -> chat messages, checked to alternate."""
    if not isinstance(row, Mapping):
        raise DatasetError(f"must be an object, got {type(row).__name__}", file=file, row=rownum)
    key = "conversations" if "conversations" in row else "messages" if "messages" in row else None
    if key is None:
        raise DatasetError("is missing", file=file, row=rownum, field="conversations")
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise DatasetError("must be a non-empty list of turns", file=file, row=rownum, field=key)
    system = _text(row, "system", file, rownum, required=False)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, Mapping):
            raise DatasetError(f"must be an object, got {type(turn).__name__}", file=file, row=rownum, field=where)
        role_key = "from" if "from" in turn else "role" if "role" in turn else None
        text_key = "value" if "value" in turn else "content" if "content" in turn else None
        if role_key is None:
            raise DatasetError("is missing (each turn needs \"from\" or \"role\")", file=file, row=rownum,
                               field=f"{where}.from")
        if text_key is None:
            raise DatasetError("is missing (each turn needs \"value\" or \"content\")", file=file, row=rownum,
                               field=f"{where}.value")
        raw_role, content = turn[role_key], turn[text_key]
        if not isinstance(content, str):
            raise DatasetError(f"must be a string, got {type(content).__name__}", file=file, row=rownum,
                               field=f"{where}.{text_key}")
        key_role = raw_role.strip().lower() if isinstance(raw_role, str) else None
        role = (_USER_ROLES.get(key_role) or _ASSISTANT_ROLES.get(key_role) or _SYSTEM_ROLES.get(key_role)
                if key_role else None)
        if role is None:
            raise DatasetError(f"unknown role {raw_role!r}; use human/user, gpt/assistant or system", file=file,
                               row=rownum, field=f"{where}.{role_key}")
        if role == "system":
            if messages:
                raise DatasetError("a system turn may only come first", file=file, row=rownum,
                                   field=f"{where}.{role_key}")
            messages.append({"role": "system", "content": content})
            continue
        previous = messages[-1]["role"] if messages else "system"
        expected = "assistant" if previous == "user" else "user"
        if role != expected:
            raise DatasetError(f"turns must alternate user/assistant starting with the user; expected {expected} "
                               f"here, got {raw_role!r}", file=file, row=rownum, field=f"{where}.{role_key}")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise DatasetError("the last turn must be the assistant's (nothing would be learned from a trailing "
                           "user turn)", file=file, row=rownum, field=f"{key}[{len(turns) - 1}]")
    return messages


def load_conversations(spec: DatasetSpec) -> tuple[list[Conversation], str]:
    """All rows of one source as validated conversations, and the format used."""
    name = spec.label()
    if spec.format not in FORMATS:
        raise DatasetError(f"unknown format {spec.format!r}; use one of {', '.join(FORMATS)}", file=name)
    fmt: str = spec.format
    if isinstance(spec.source, SelfCognition):
        rows = list(enumerate(spec.source.rows(), start=1))
        fmt = "alpaca"
    elif isinstance(spec.source, (str, os.PathLike)):
        rows = read_rows(spec.source)
    elif isinstance(spec.source, Sequence):
        rows = list(enumerate(spec.source, start=1))
        if not rows:
            raise DatasetError("has no rows", file=name)
    else:
        raise DatasetError(f"source must be a file path, a list of rows or SelfCognition, got "
                           f"{type(spec.source).__name__}", file=name)
    if fmt == "auto":
        fmt = detect_format(rows[0][1], name, rows[0][0])
    convert = alpaca_to_messages if fmt == "alpaca" else sharegpt_to_messages
    return [Conversation(convert(row, name, n), name, n) for n, row in rows], fmt


def mix(specs: Sequence[DatasetSpec], seed: int) -> MixedConversations:
    """Load every source and draw each one's `samples` (seeded, so the same seed gives the same mix)."""
    if not specs:
        raise DatasetError("no datasets given; add at least one", file="<datasets>")
    out = MixedConversations([], [])
    for index, spec in enumerate(specs):
        convs, fmt = load_conversations(spec)
        chosen = convs
        if spec.samples is not None:
            if isinstance(spec.samples, bool) or not isinstance(spec.samples, int) or spec.samples < 1:
                raise DatasetError(f"samples must be a positive integer, got {spec.samples!r}", file=spec.label())
            rng = random.Random(f"{seed}/{index}")
            full, rest = divmod(spec.samples, len(convs))
            picks = list(range(len(convs))) * full + sorted(rng.sample(range(len(convs)), rest))
            chosen = [convs[i] for i in picks]
            if spec.samples > len(convs):  # only when rows repeat
                out.notes.append(f"{spec.label()}: {spec.samples} samples requested from {len(convs)} rows, so "
                                 f"each row is used {full}{f'-{full + 1}' if rest else ''} times")
        out.conversations += chosen
        out.by_source.append(chosen)
        out.sources.append(SourceStats(spec.label(), fmt, len(convs), len(chosen)))
    return out
