"""Splitting a streamed reply into reasoning, answer and tool calls, as Qwen's chat templates write them.

Qwen3 thinks inside `<think>...</think>` before answering, and Qwen2.5 and Qwen3 call tools with
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks. The reply's text arrives in pieces that may cut
a tag anywhere, so the parser holds back text that could still become a tag and hands out each piece once it
knows which part it belongs to. The notebook reply and the OpenAI server (reasoning_content, tool_calls) both
read replies through it, so they agree on where reasoning ends and what a tool call is.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass
class MalformedToolCall:
    """A `<tool_call>` block that is not a JSON object with a name and arguments; its text stays in the answer."""
    text: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "error": self.error}


Kind = Literal["reasoning", "content"]


@dataclass
class Pieces:
    """What one push() made safe to show: reasoning and answer text, and tool calls completed."""
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    malformed: list[MalformedToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls or self.malformed)


def template_thinks(chat_template: str | None) -> bool:
    """Whether a chat template writes `<think>` blocks (Qwen3's do; Qwen2.5's do not, so its replies are never
    split: a literal "<think>" there is answer text)."""
    return bool(chat_template) and THINK_OPEN in str(chat_template)


def parse_tool_call(body: str) -> ToolCall | str:
    """The call inside one `<tool_call>` block, or why it is not one."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return 'not a JSON object with a "name" string'
    args = data.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string, as the OpenAI API carries them
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return f'its "arguments" string is not valid JSON ({e.msg})'
    if not isinstance(args, dict):
        return f'its "arguments" is a {type(args).__name__}, not a JSON object'
    return ToolCall(name=data["name"], arguments=args)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag` (it may become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReplyParser:
    """Feed decoded text with push(), then flush() once at the end; read the whole parts from the attributes.

    `thinking`: the template writes `<think>` blocks, so a reply that opens with one has reasoning first.
    `in_reasoning`: the prompt already opened the block (templates that end the generation prompt with
    `<think>\\n`), so the reply starts inside it. `tools`: `<tool_call>` blocks are calls, not answer text.
    `open_tool_call`: the prompt already wrote `<tool_call>` and this start of its JSON (a forced call), so
    the reply continues it.
    """

    def __init__(self, thinking: bool = False, tools: bool = False, in_reasoning: bool = False,
                 open_tool_call: str | None = None) -> None:
        self._tools = tools or open_tool_call is not None
        self._state: str = "reasoning" if in_reasoning else ("opening" if thinking else "content")
        self._buf = ""
        self._call = ""
        self._reasoning_started = False
        self._newlines_after_think = False
        if open_tool_call is not None:
            self._state, self._call = "tool", open_tool_call
        self.reasoning = ""
        self.content = ""
        self.tool_calls: list[ToolCall] = []
        self.malformed: list[MalformedToolCall] = []
        self._held_space = ""  # whitespace around tool calls, shown only if answer text follows it

    @property
    def reasoning_done(self) -> bool:
        """Past the reasoning block (or there was none)."""
        return self._state not in ("opening", "reasoning")

    def push(self, text: str) -> Pieces:
        self._buf += text
        out = Pieces()
        while self._buf and self._step(out, final=False):
            pass
        return out

    def flush(self) -> Pieces:
        out = Pieces()
        while self._buf and self._step(out, final=True):
            pass
        if self._state == "tool":
            # The reply ended inside a call (its token budget ran out): keep what it wrote as answer text.
            text = TOOL_OPEN + self._call
            self.malformed.append(MalformedToolCall(text, "the reply ended before </tool_call> (raise max_tokens)"))
            out.malformed.append(self.malformed[-1])
            self._emit_content(out, text)
            self._call = ""
        if self._held_space and not self.tool_calls:  # trailing whitespace of an answer without calls is its own
            self.content += self._held_space
            out.content += self._held_space
        self._held_space = ""
        self._state = "content"
        return out

    # One transition of the state machine over the buffer; False when it must wait for more text.
    def _step(self, out: Pieces, final: bool) -> bool:
        if self._state == "opening":
            head = self._buf.lstrip()
            if head.startswith(THINK_OPEN):
                self._buf = head[len(THINK_OPEN):]
                self._state = "reasoning"
                return True
            if not final and (not head or THINK_OPEN.startswith(head)):
                return False
            self._state = "content"
            return True
        if self._state == "reasoning":
            at = self._buf.find(THINK_CLOSE)
            if at >= 0:
                self._emit_reasoning(out, self._buf[:at].rstrip("\n"))
                self._buf = self._buf[at + len(THINK_CLOSE):]
                self._state = "after_think"
                return True
            # Hold a possible start of </think> and trailing newlines (the block's text is stored stripped).
            keep = 0
            if not final:
                keep = _partial_suffix(self._buf, THINK_CLOSE)
                head = self._buf[:len(self._buf) - keep]
                keep += len(head) - len(head.rstrip("\n"))
            self._emit_reasoning(out, self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        if self._state == "after_think":
            stripped = self._buf.lstrip("\n")
            if not stripped and not final:
                self._buf = ""
                return False
            self._buf, self._state = stripped, "content"
            return True
        if self._state == "tool":
            self._call += self._buf
            self._buf = ""
            at = self._call.find(TOOL_CLOSE)
            if at < 0:
                return False
            body, rest = self._call[:at], self._call[at + len(TOOL_CLOSE):]
            self._call, self._buf, self._state = "", rest, "content"
            parsed = parse_tool_call(body.strip())
            if isinstance(parsed, ToolCall):
                self.tool_calls.append(parsed)
                out.tool_calls.append(parsed)
                self._held_space = ""
            else:
                text = TOOL_OPEN + body + TOOL_CLOSE
                self.malformed.append(MalformedToolCall(text, f"tool call {len(self.malformed) + 1} is {parsed}"))
                out.malformed.append(self.malformed[-1])
                self._emit_content(out, text)
            return True
        # content
        if not self._tools:
            self._emit_content(out, self._buf)
            self._buf = ""
            return False
        at = self._buf.find(TOOL_OPEN)
        if at >= 0:
            self._emit_content(out, self._buf[:at])
            self._buf = self._buf[at + len(TOOL_OPEN):]
            self._state = "tool"
            return True
        keep = 0 if final else _partial_suffix(self._buf, TOOL_OPEN)
        self._emit_content(out, self._buf[:len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]
        return False

    def _emit_reasoning(self, out: Pieces, text: str) -> None:
        if not self._reasoning_started:
            text = text.lstrip("\n")
            if not text:
                return
            self._reasoning_started = True
        self.reasoning += text
        out.reasoning += text

    def _emit_content(self, out: Pieces, text: str) -> None:
        """Answer text; with tools, trailing whitespace is held until more answer text follows it, so the
        newlines around calls do not become an answer of their own."""
        if not text:
            return
        if self._tools:
            text = self._held_space + text
            body = text.rstrip()
            self._held_space = text[len(body):]
            text = body
        if text:
            self.content += text
            out.content += text
