"""Preference pairs: `{prompt | messages, chosen, rejected}` rows (the shape TRL and LLaMA-Factory use) read,
checked and encoded through the chat template.

`prompt` is the user's message (a string); `messages` is a multi-turn history ([{role, content}], optionally
starting with a system turn) ending with a user turn; `system` may be given beside `prompt`. `chosen` and
`rejected` are the two answers, each a string or an assistant message ({role: "assistant", content}, or a
one-message list of it, as TRL's conversational rows hold them). Every problem names the file, row and field.

Each answer is rendered after the shared history with the chat template; only its own tokens (and the end-of-turn
marker) are scored, the history's answers included in the prompt are not.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qwenbook_bridge.engine.data.chat_encoding import IGNORE_INDEX, ChatEncoder, DatasetStats, Example, label_segments
from qwenbook_bridge.engine.data.datasets import DatasetError, DatasetSpec, SourceStats, read_rows

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


@dataclass
class PreferencePair:
    """One row's prompt messages and its two answers, with where it came from."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    source: str
    row: int


@dataclass
class PreferenceExample:
    chosen: Example
    rejected: Example
    source: str
    row: int
    # The reference model's summed log-probabilities of (chosen, rejected) where they are computed before
    # training (see engine/train/preference.py); None when the step computes them.
    ref_logps: tuple[float, float] | None = None

    @property
    def input_ids(self) -> list[int]:  # the longer row, what batching and length limits look at
        return max(self.chosen.input_ids, self.rejected.input_ids, key=len)


@dataclass
class PreferenceDataset:
    examples: list[PreferenceExample]
    stats: DatasetStats  # for pairs: each pair counts both of its rows' tokens

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for ex in self.examples:
            for part in (ex.chosen, ex.rejected):
                h.update(array("q", part.input_ids).tobytes())
                h.update(array("q", part.labels).tobytes())
        return h.hexdigest()[:16]


def _answer(value: Any, file: str, rownum: int, key: str) -> str:
    if isinstance(value, str):
        if not value.strip():
            raise DatasetError("is empty", file=file, row=rownum, field=key)
        return value
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, Mapping):
        role = value.get("role", value.get("from", "assistant"))
        content = value.get("content", value.get("value"))
        if _ROLES.get(str(role).lower()) != "assistant":
            raise DatasetError(f"must be the assistant's message, got role {role!r}", file=file, row=rownum,
                               field=f"{key}.role")
        if not isinstance(content, str) or not content.strip():
            raise DatasetError("must be a non-empty string", file=file, row=rownum, field=f"{key}.content")
        return content
    if value is None:
        raise DatasetError("is missing", file=file, row=rownum, field=key)
    raise DatasetError(f"must be a string or an assistant message {{role, content}}, got {type(value).__name__}",
                       file=file, row=rownum, field=key)


def _history(value: Any, file: str, rownum: int) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DatasetError("must be a non-empty list of {role, content} turns ending with the user's", file=file,
                           row=rownum, field="messages")
    out: list[dict[str, str]] = []
    for i, turn in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(turn, Mapping):
            raise DatasetError(f"must be an object, got {type(turn).__name__}", file=file, row=rownum, field=where)
        raw = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        role = _ROLES.get(raw.lower()) if isinstance(raw, str) else None
        if role is None:
            raise DatasetError(f"unknown role {raw!r}; use user, assistant or system", file=file, row=rownum,
                               field=f"{where}.role")
        if not isinstance(content, str):
            raise DatasetError(f"must be a string, got {type(content).__name__}", file=file, row=rownum,
                               field=f"{where}.content")
        if role == "system":
            if out:
                raise DatasetError("a system turn may only come first", file=file, row=rownum, field=f"{where}.role")
        else:
            expected = "assistant" if out and out[-1]["role"] == "user" else "user"
            if role != expected:
                raise DatasetError(f"turns must alternate user/assistant starting with the user; expected {expected}"
                                   f" here, got {raw!r}", file=file, row=rownum, field=f"{where}.role")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise DatasetError("must end with the user's turn (chosen and rejected are the answers to it)", file=file,
                           row=rownum, field=f"messages[{len(value) - 1}]")
    return out


def row_to_pair(row: Any, file: str, rownum: int) -> PreferencePair:
    if not isinstance(row, Mapping):
        raise DatasetError(f"must be an object, got {type(row).__name__}", file=file, row=rownum)
    has_prompt, has_messages = row.get("prompt") is not None, row.get("messages") is not None
    if has_prompt == has_messages:
        raise DatasetError("give exactly one of \"prompt\" (the user's message) and \"messages\" (a history "
                           "ending with the user's turn)", file=file, row=rownum, field="prompt")
    if has_prompt:
        prompt = row["prompt"]
        if isinstance(prompt, list):  # TRL's conversational prompt: a list of turns
            messages = _history(prompt, file, rownum)
        elif isinstance(prompt, str) and prompt.strip():
            messages = [{"role": "user", "content": prompt}]
        else:
            raise DatasetError("must be a non-empty string", file=file, row=rownum, field="prompt")
    else:
        messages = _history(row["messages"], file, rownum)
    system = row.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise DatasetError(f"must be a string, got {type(system).__name__}", file=file, row=rownum, field="system")
        if messages[0]["role"] == "system":
            raise DatasetError("is given twice: as \"system\" and as the first turn", file=file, row=rownum,
                               field="system")
        messages = [{"role": "system", "content": system}, *messages]
    chosen = _answer(row.get("chosen"), file, rownum, "chosen")
    rejected = _answer(row.get("rejected"), file, rownum, "rejected")
    return PreferencePair(messages, chosen, rejected, file, rownum)


def load_pairs(specs: Sequence[DatasetSpec]) -> list[PreferencePair]:
    """Every row of every source, checked (the first bad row raises DatasetError naming file, row and field)."""
    if not specs:
        raise DatasetError("no datasets given; add at least one", file="<datasets>")
    pairs: list[PreferencePair] = []
    for spec in specs:
        name = spec.label()
        if isinstance(spec.source, (str, os.PathLike)):
            rows = read_rows(spec.source)
        elif isinstance(spec.source, Sequence) and not isinstance(spec.source, str):
            rows = list(enumerate(spec.source, start=1))
            if not rows:
                raise DatasetError("has no rows", file=name)
        else:
            raise DatasetError("preference data must be a .json/.jsonl file or a list of rows", file=name)
        picked = [row_to_pair(row, name, n) for n, row in rows]
        if spec.samples is not None:
            picked = [picked[i % len(picked)] for i in range(spec.samples)]
        pairs += picked
    return pairs


def _encode_answer(encoder: ChatEncoder, prompt: list[dict[str, str]], answer: str) -> tuple[list[int], list[int],
                                                                                              bool]:
    """(ids, labels, consistent) of the prompt followed by `answer`; only the last answer's span is scored."""
    pieces = encoder.segments([*prompt, {"role": "assistant", "content": answer}])
    last = max(i for i, (_, trained) in enumerate(pieces) if trained)
    pieces = [(text, trained and i == last) for i, (text, trained) in enumerate(pieces)]
    encoded = encoder.tokenizer([t for t, _ in pieces], add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    labels: list[int] = []
    for piece_ids, (_, trained) in zip(encoded, pieces):
        ids += piece_ids
        labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
    whole = encoder.tokenizer("".join(t for t, _ in pieces), add_special_tokens=False)["input_ids"]
    return ids, labels, whole == ids


def build_preference_dataset(specs: Sequence[DatasetSpec], tokenizer: Any, max_length: int, *,
                             truncation: str = "truncate") -> PreferenceDataset:
    """Read, check and encode every pair. A pair longer than max_length is truncated on the right (its prompt
    kept) or dropped; a pair whose answer would be cut away entirely is dropped; all are counted in the stats."""
    pairs = load_pairs(specs)
    encoder = ChatEncoder(tokenizer)
    stats = DatasetStats(sources=[SourceStats(s.label(), "preference", rows, rows) for s in specs
                                  for rows in [sum(1 for p in pairs if p.source == s.label())]],
                         max_length=max_length)
    examples: list[PreferenceExample] = []
    for p in pairs:
        parts = []
        for key, answer in (("chosen", p.chosen), ("rejected", p.rejected)):
            try:
                ids, labels, consistent = _encode_answer(encoder, p.prompt, answer)
            except DatasetError as e:
                raise DatasetError(e.reason, file=p.source, row=p.row, field=key) from None
            stats.retokenized_boundaries += not consistent
            parts.append(Example(ids, labels, p.source, p.row))
        if max(len(x.input_ids) for x in parts) > max_length:
            stats.too_long += 1
            if truncation == "drop":
                stats.dropped_too_long += 1
                continue
            for x in parts:
                x.input_ids, x.labels, x.truncated = x.input_ids[:max_length], x.labels[:max_length], True
            stats.truncated += 1
        if any(x.trained_tokens == 0 for x in parts):
            stats.dropped_no_answer += 1
            continue
        examples.append(PreferenceExample(parts[0], parts[1], p.source, p.row))
        stats.tokens += sum(len(x.input_ids) for x in parts)
        stats.trained_tokens += sum(x.trained_tokens for x in parts)
    stats.examples = len(examples)
    if stats.too_long:
        action = "dropped" if truncation == "drop" else "truncated"
        stats.notes.append(f"{stats.too_long} of {len(pairs)} pairs are longer than max_length={max_length} tokens "
                           f"and were {action}")
    if stats.dropped_no_answer:
        stats.notes.append(f"{stats.dropped_no_answer} pairs were skipped: after truncation to {max_length} tokens "
                           "an answer had no token left to score")
    if not examples:
        raise DatasetError(f"no usable pairs remain after length limits; raise max_length (now {max_length})",
                           file=", ".join(s.label() for s in specs))
    return PreferenceDataset(examples, stats)


def preview_pairs(specs: Sequence[DatasetSpec], tokenizer: Any, n: int, *, max_length: int | None = None
                  ) -> list[dict[str, Any]]:
    """The first `n` pairs as the loss sees them: each answer's rendering as segments {text, trained}."""
    encoder = ChatEncoder(tokenizer)
    out = []
    for p in load_pairs(specs)[:n]:
        entry: dict[str, Any] = {"source": p.source, "row": p.row}
        for key, answer in (("chosen", p.chosen), ("rejected", p.rejected)):
            ids, labels, _ = _encode_answer(encoder, p.prompt, answer)
            truncated = max_length is not None and len(ids) > max_length
            if truncated:
                ids, labels = ids[:max_length], labels[:max_length]
            entry[key] = {"tokens": len(ids), "truncated": truncated,
                          "trained_tokens": Example(ids, labels, p.source, p.row).trained_tokens,
                          "segments": label_segments(tokenizer, ids, labels)}
        out.append(entry)
    return out
