"""From chat messages, tools and the thinking switch to the prompt's token ids, through the model's own template.

The notebook and the OpenAI server both build prompts here, so a tool, a tool result or an assistant's earlier
tool calls render the same way on both, exactly as `tokenizer.apply_chat_template` renders them for the same
arguments (the tests hold that), and both read the reply with the parser this prompt calls for.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qwenbook_bridge.engine.errors import InvalidOptionError, NoChatTemplateError
from qwenbook_bridge.engine.generate.reply_parts import THINK_OPEN, TOOL_OPEN, ReplyParser, template_thinks

ROLES = ("system", "user", "assistant", "tool")
# OpenAI's rule for function names, which the server's clients follow too.
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class ChatPrompt:
    ids: list[int]
    text: str
    thinks: bool  # the template writes <think> blocks, so the reply may open with one
    in_reasoning: bool  # the prompt itself opened the block
    tools: bool
    open_tool_call: str | None  # a forced call: the JSON the prompt already began

    def parser(self) -> ReplyParser:
        return ReplyParser(thinking=self.thinks, tools=self.tools, in_reasoning=self.in_reasoning,
                           open_tool_call=self.open_tool_call)


def _arguments(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):  # the OpenAI API carries them as a JSON string
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise InvalidOptionError(f"{where}.arguments is not valid JSON ({e.msg}); pass an object or its JSON text")
    if not isinstance(value, dict):
        raise InvalidOptionError(f"{where}.arguments must be a JSON object, got {type(value).__name__}")
    return value


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise InvalidOptionError(f"{where}.tool_calls must be a list of {{name, arguments}}, got {calls!r}")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidOptionError(f"{at} must be {{name, arguments}} (or OpenAI's {{type: 'function', function: "
                                     f"{{name, arguments}}}}), got {call!r}")
        item: dict[str, Any] = {"type": "function",
                                "function": {"name": fn["name"], "arguments": _arguments(fn.get("arguments", {}), at)}}
        if isinstance(call.get("id"), str):
            item["id"] = call["id"]
        out.append(item)
    return out


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """The messages as the template reads them: roles system, user, assistant (with the tool calls it made, if
    any) and tool (a tool's result); anything else is refused with the index and what was wrong."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidOptionError("messages must be a non-empty list of {role, content} objects")
    clean: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role == "assistant" and calls and content is None:
            content = ""  # a turn that only called tools
        if role not in ROLES or not isinstance(content, str):
            raise InvalidOptionError(
                f"{where} must be {{role: 'system' | 'user' | 'assistant' | 'tool', content: string}}, got {m!r}")
        item: dict[str, Any] = {"role": role, "content": content}
        if calls:
            if role != "assistant":
                raise InvalidOptionError(f"{where} has tool_calls, which only an assistant message can have")
            item["tool_calls"] = _tool_calls(calls, where)
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(m.get(key), str):
                    item[key] = m[key]
        clean.append(item)
    return clean


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """Tools as the templates take them (OpenAI's {type: 'function', function: {...}}), from that shape or the
    notebook's {name, description, parameters}."""
    if not isinstance(tools, (list, tuple)):
        raise InvalidOptionError(f"tools must be a list of {{name, description, parameters}}, got {tools!r}")
    out, names = [], set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _TOOL_NAME.match(fn["name"]):
            raise InvalidOptionError(
                f"tools[{i}] needs a name of 1-64 letters, digits, _ . or - (and optionally a description and "
                f"parameters as a JSON Schema object), got {tool!r}")
        if fn["name"] in names:
            raise InvalidOptionError(f"tools[{i}] repeats the name {fn['name']!r}; each tool needs its own")
        names.add(fn["name"])
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise InvalidOptionError(f"tools[{i}].parameters must be a JSON Schema object, got {params!r}")
        desc = fn.get("description", "")
        if not isinstance(desc, str):
            raise InvalidOptionError(f"tools[{i}].description must be a string, got {desc!r}")
        out.append({"type": "function", "function": {"name": fn["name"], "description": desc, "parameters": params}})
    return out


def render_chat(tokenizer: Any, model_id: str, messages: Sequence[dict[str, Any]], *,
                tools: Sequence[dict[str, Any]] | None = None, thinking: bool | None = None,
                force_tool: str | None = None) -> ChatPrompt:
    """The prompt for checked `messages` and `tools`, ending with the assistant turn's opening. `thinking`
    is the template's enable_thinking (None: the template's default). `force_tool` makes the reply a call:
    a tool's name, or "required" for any of `tools`; the prompt then opens the call itself."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise NoChatTemplateError(
            f"the tokenizer of {model_id} has no chat template, so chat messages cannot be turned into a "
            "prompt; load an instruct/chat model (e.g. Qwen/Qwen2.5-7B-Instruct) or add a chat_template to its "
            "tokenizer_config.json")
    if tools and "tools" not in str(template):
        raise InvalidOptionError(f"the chat template of {model_id} does not write tools into the prompt, so the "
                                 "model would never see them; use a Qwen2.5 or Qwen3 instruct model's template")
    if force_tool is not None:
        known = [t["function"]["name"] for t in tools or []]
        if not known:
            raise InvalidOptionError("tool_choice asks for a tool call but no tools were given")
        if force_tool != "required" and force_tool not in known:
            raise InvalidOptionError(f"tool_choice names {force_tool!r}, which is not among the tools ({known})")
    kwargs: dict[str, Any] = {}
    if tools:
        kwargs["tools"] = list(tools)
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    thinks = template_thinks(template)
    if force_tool is not None and thinks and thinking is not False:
        kwargs["enable_thinking"] = False  # a forced call starts at once; the template writes an empty block
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False, **kwargs)
    open_call = None
    if force_tool is not None:
        open_call = '\n{"name": "' + ("" if force_tool == "required" else force_tool + '", "arguments": ')
        text += TOOL_OPEN + open_call
    # Thinking-only templates end the generation prompt inside the block: the reply starts in its reasoning.
    in_reasoning = thinks and force_tool is None and text.rstrip("\n").endswith(THINK_OPEN)
    # The template already wrote every special token; letting the tokenizer add a BOS would double it.
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ChatPrompt(ids=ids, text=text, thinks=thinks, in_reasoning=in_reasoning, tools=bool(tools),
                      open_tool_call=open_call)
