"""Conversations -> token ids and labels through the model's own chat template, with exact answer masking.

Labels are -100 everywhere except the assistant answers and the template's end-of-turn marker after each
(`<|im_end|>` for Qwen), so the loss teaches the answers and when to stop, never the prompts.

How the answer spans are found: for assistant turn i, the conversation up to turn i rendered with the
generation prompt is, for well-behaved templates, a prefix of the full rendering, and the answer starts right
after it and runs to the end of the message's visible answer (its text after any `</think>`). Where the template
writes a reasoning block there, Qwen3's `<think>...</think>` (empty when the row has no reasoning), the block is
part of the answer and trained: with thinking on, the model has to write it itself before answering. Qwen3's
template drops the reasoning of turns before the last user message from the history, as it does at inference;
those turns train on their answer alone, and the dropped reasoning is counted in the dataset notes. Where the
prefix does not match, each message's text is located in order. The full text is then tokenized segment by
segment, exactly as at inference (the prompt is tokenized on its own and the answer follows it); rows where
that differs from tokenizing the whole text at once are counted and reported.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from qwenbook_bridge.engine.data.datasets import DatasetError, DatasetSpec, SourceStats, mix
from qwenbook_bridge.engine.errors import InvalidOptionError, NoChatTemplateError

IGNORE_INDEX = -100
Truncation = Literal["truncate", "drop"]
_PROBE_ANSWER = "QWENBOOK-PROBE-ANSWER-7f3a"
THINK_END = "</think>"


def split_reasoning(content: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message as Qwen3's template splits it: the text before the last
    `</think>` (after its `<think>`) and the text after it; ("", content) without a `</think>`."""
    if THINK_END not in content:
        return "", content
    before, answer = content.rsplit(THINK_END, 1)
    return before.split("<think>")[-1].strip("\n"), answer.lstrip("\n")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    source: str
    row: int
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        # labels[0] is never a target: the loss predicts token t from tokens before it.
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


@dataclass
class DatasetStats:
    sources: list[SourceStats]
    examples: int = 0
    too_long: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_answer: int = 0
    retokenized_boundaries: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    max_length: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["sources"] = [dict(vars(s)) for s in self.sources]
        return d


@dataclass
class TokenizedDataset:
    examples: list[Example]
    stats: DatasetStats
    _fingerprint: str | None = field(default=None, repr=False)

    def fingerprint(self) -> str:
        """A short hash of every id and label, to tell whether a resumed run sees the same data."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for ex in self.examples:
                h.update(array("q", ex.input_ids).tobytes())
                h.update(array("q", ex.labels).tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


class ChatEncoder:
    """Renders chat messages with a tokenizer's chat template into (token ids, labels)."""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise NoChatTemplateError("the tokenizer has no chat template, so rows cannot be rendered as chats; "
                                      "use an instruct model or add a chat_template to tokenizer_config.json")
        self.tokenizer = tokenizer
        self.end_marker = self._find_end_marker()

    def _render(self, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _find_end_marker(self) -> str:
        """What the template writes after an answer, minus trailing whitespace (Qwen: "<|im_end|>")."""
        text = self._render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE_ANSWER}],
                            False)
        at = text.rfind(_PROBE_ANSWER)
        return text[at + len(_PROBE_ANSWER):].rstrip() if at >= 0 else ""

    def segments(self, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
        """The rendered conversation as consecutive (text, trained) pieces that join to the full rendering."""
        full = self._render(messages, False)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, msg in enumerate(messages):
            content = msg["content"]
            start = -1
            if msg["role"] == "assistant":
                prefix = self._render(messages[:i], True)
                if len(prefix) >= cursor and full.startswith(prefix):
                    end = self._answer_end(full, len(prefix), content)
                    if end >= 0:
                        start, content = len(prefix), full[len(prefix):end]
            if start < 0 and msg["role"] == "assistant" and THINK_END in content:
                # The template rewrote the reasoning (or dropped it): the visible answer is what it kept.
                content = split_reasoning(content)[1]
            if start < 0:
                start = full.find(content, cursor)
                if start < 0 and content.strip():
                    content = content.strip()
                    start = full.find(content, cursor)
            if start < 0:
                raise DatasetError("the chat template does not reproduce this message's text, so its span "
                                   "cannot be found", file="<chat template>", field=f"message {i} ({msg['role']})")
            end = start + len(content)
            if msg["role"] == "assistant":
                if self.end_marker and full.startswith(self.end_marker, end):
                    end += len(self.end_marker)
                spans.append((start, end))
            cursor = end
        pieces: list[tuple[str, bool]] = []
        at = 0
        for start, end in spans:
            if start > at:
                pieces.append((full[at:start], False))
            pieces.append((full[start:end], True))
            at = end
        if at < len(full):
            pieces.append((full[at:], False))
        return pieces

    def _answer_end(self, full: str, start: int, content: str) -> int:
        """Where the assistant message that the template begins at `start` ends (before its end marker), or -1 when
        its visible answer is not the next thing in that turn."""
        turn_end = full.find(self.end_marker, start) if self.end_marker else -1
        answer = split_reasoning(content)[1] if THINK_END in content else content
        if not answer:
            return turn_end
        # The answer follows the turn's reasoning block, if the template wrote one (the reasoning may quote it).
        think_end = full.find(THINK_END, start, turn_end if turn_end >= 0 else len(full))
        at = full.find(answer, start if think_end < 0 else think_end + len(THINK_END))
        if at < 0 or (0 <= turn_end < at + len(answer)):
            return -1
        # Only a reasoning block the template wrote may sit between the turn's start and its answer.
        between = full[start:at]
        return at + len(answer) if not between or between.lstrip().startswith("<think>") else -1

    def dropped_reasoning(self, messages: Sequence[dict[str, str]]) -> int:
        """How many assistant messages carry reasoning that the rendered conversation leaves out (Qwen3 keeps
        only the reasoning after the last user message)."""
        full = self._render(messages, False)
        return sum(1 for m in messages if m["role"] == "assistant" and THINK_END in m["content"]
                   and (r := split_reasoning(m["content"])[0].strip()) and r not in full)

    def encode(self, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int], bool]:
        """(input_ids, labels, consistent): `consistent` is False when tokenizing the whole text at once
        would split a prompt/answer boundary differently."""
        pieces = self.segments(messages)
        texts = [t for t, _ in pieces]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        labels: list[int] = []
        for piece_ids, (_, trained) in zip(encoded, pieces):
            ids += piece_ids
            labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
        whole = self.tokenizer("".join(texts), add_special_tokens=False)["input_ids"]
        return ids, labels, whole == ids


def build_dataset(specs: Sequence[DatasetSpec], tokenizer: Any, max_length: int, *,
                  truncation: Truncation = "truncate", seed: int = 42) -> TokenizedDataset:
    """Load, mix, render and tokenize every source. Rows longer than `max_length` are truncated (or dropped
    with truncation="drop"); either way they are counted in the stats and described in `stats.notes`."""
    if truncation not in ("truncate", "drop"):
        raise InvalidOptionError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise InvalidOptionError(f"max_length must be an integer >= 2, got {max_length!r}")
    mixed = mix(specs, seed)
    encoder = ChatEncoder(tokenizer)
    stats = DatasetStats(sources=mixed.sources, max_length=max_length, notes=list(mixed.notes))
    examples: list[Example] = []
    dropped_reasoning = 0
    for conv in mixed.conversations:
        try:
            ids, labels, consistent = encoder.encode(conv.messages)
        except DatasetError as e:
            raise DatasetError(e.reason, file=conv.source, row=conv.row, field=e.field) from None
        stats.retokenized_boundaries += not consistent
        if any(m["role"] == "assistant" and THINK_END in m["content"] for m in conv.messages):
            dropped_reasoning += encoder.dropped_reasoning(conv.messages)
        ex = Example(ids, labels, conv.source, conv.row)
        if len(ids) > max_length:
            stats.too_long += 1
            if truncation == "drop":
                stats.dropped_too_long += 1
                continue
            ex.input_ids, ex.labels, ex.truncated = ids[:max_length], labels[:max_length], True
            stats.truncated += 1
        if ex.trained_tokens == 0:
            stats.dropped_no_answer += 1
            continue
        examples.append(ex)
        stats.tokens += len(ex.input_ids)
        stats.trained_tokens += ex.trained_tokens
    stats.examples = len(examples)
    _describe(stats, truncation)
    if dropped_reasoning:
        stats.notes.append(f"{dropped_reasoning} assistant turns before a row's last user message have reasoning "
                           "(<think>...</think>) that the chat template leaves out of the history, as at inference; "
                           "those turns train on their answers only")
    if not examples:
        raise DatasetError("no usable examples remain after rendering and length limits; raise max_length "
                           f"(now {max_length})", file=", ".join(s.name for s in stats.sources))
    return TokenizedDataset(examples, stats)


def _describe(stats: DatasetStats, truncation: str) -> None:
    if stats.too_long:
        action = "dropped" if truncation == "drop" else "truncated"
        stats.notes.append(f"{stats.too_long} of {stats.examples + stats.dropped_too_long + stats.dropped_no_answer} "
                           f"rows are longer than max_length={stats.max_length} tokens and were {action}")
    if stats.dropped_no_answer:
        stats.notes.append(f"{stats.dropped_no_answer} rows were skipped: after truncation to {stats.max_length} "
                           "tokens no answer token was left to learn from")
    if stats.retokenized_boundaries:
        stats.notes.append(f"{stats.retokenized_boundaries} rows tokenize differently at a prompt/answer boundary "
                           "when tokenized whole; they are tokenized as at inference (prompt first, then answer)")


def preview(specs: Sequence[DatasetSpec], tokenizer: Any, n: int = 3, *, max_length: int | None = None,
            seed: int = 42) -> list[dict[str, Any]]:
    """The first `n` rendered examples, taken from the sources in turn, as segments {text, trained}: exactly the
    text the loss sees (trained=True) and the text it ignores."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidOptionError(f"preview needs a positive number of examples, got {n!r}")
    mixed = mix(specs, seed)
    queues = [list(q) for q in mixed.by_source]
    picked = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    encoder = ChatEncoder(tokenizer)
    out = []
    for conv in picked:
        ids, labels, _ = encoder.encode(conv.messages)
        truncated = max_length is not None and len(ids) > max_length
        if truncated:
            ids, labels = ids[:max_length], labels[:max_length]
        out.append({"source": conv.source, "row": conv.row, "tokens": len(ids),
                    "trained_tokens": Example(ids, labels, conv.source, conv.row).trained_tokens,
                    "truncated": truncated, "segments": label_segments(tokenizer, ids, labels)})
    return out


def label_segments(tokenizer: Any, ids: Sequence[int], labels: Sequence[int]) -> list[dict[str, Any]]:
    """Runs of consecutive tokens with the same trained flag, decoded: [{text, trained}]."""
    runs: list[dict[str, Any]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            runs.append({"text": tokenizer.decode(list(ids[start:i]), skip_special_tokens=False),
                         "trained": labels[start] != IGNORE_INDEX})
            start = i
    return runs
