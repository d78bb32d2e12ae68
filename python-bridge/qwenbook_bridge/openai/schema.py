"""OpenAI-compatible request parsing and response shapes, with no HTTP or model in sight.

Requests are validated by hand rather than by a pydantic model so that every rejection reads like
OpenAI's own (which parameter, what was wrong) and carries the `param` field clients display.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

CHAT_ROLES = ("system", "user", "assistant", "tool")
# OpenAI's newer name for the system role; Qwen's templates know only "system".
ROLE_ALIASES = {"developer": "system"}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}  # e.g. Retry-After on a 429, Connection: close on a 408

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def context_too_long(context: int, prompt_tokens: int, max_tokens: int | None, chat: bool) -> OpenAIError:
    """vLLM's wording, which clients and proxies already recognise, with OpenAI's code for it."""
    where = "messages" if chat else "prompt"
    if max_tokens is None:
        message = (f"This model's maximum context length is {context} tokens. However, your {where} resulted in "
                   f"{prompt_tokens} tokens, which leaves no room for a reply. Please reduce the length of the "
                   f"{where}.")
    else:
        message = (f"This model's maximum context length is {context} tokens. However, you requested "
                   f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {where}, {max_tokens} in the "
                   f"completion). Please reduce the length of the {where} or completion (max_tokens at most "
                   f"{max(context - prompt_tokens, 0)} for this {where}).")
    return OpenAIError(400, message, param=where, code="context_length_exceeded")


@dataclass
class CommonRequest:
    """What both endpoints' bodies share, as the client sent it; None means 'the model's default'. The server
    turns the sampling fields into the engine's SamplingParams once the prompt's length is known (routes.py)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None  # vLLM's extra: drop tokens below min_p times the most likely one
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


@dataclass
class ChatRequest(CommonRequest):
    # As the chat template reads them: {role, content}, an assistant's tool_calls and a tool's tool_call_id kept.
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    # "none" (tools stay out of the prompt), "auto" (the model decides), "required" (some call) or a tool's name.
    tool_choice: str = "none"
    parallel_tool_calls: bool = True
    thinking: bool | None = None  # the template's enable_thinking; None: the template's default


@dataclass
class CompletionRequest(CommonRequest):
    prompt: str | list[int] = ""
    echo: bool = False


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"The request body is not valid JSON ({exc}). Send a JSON object with "
                          "Content-Type: application/json.") from None
    if not isinstance(body, dict):
        raise bad_request(f"The request body must be a JSON object, not {_json_type(body)}.")
    return body


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    req = ChatRequest()
    _parse_common(body, req)
    if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
        req.max_tokens = _int(body, "max_completion_tokens", minimum=1)
    messages = body.get("messages")
    if messages is None:
        raise bad_request("Missing required parameter: 'messages'.", "messages")
    if not isinstance(messages, list):
        raise bad_request(f"Invalid type for 'messages': expected an array, but got {_json_type(messages)} instead.",
                          "messages")
    if not messages:
        raise bad_request("'messages' is empty: send at least one message, e.g. "
                          '[{"role": "user", "content": "Hello"}].', "messages", "empty_array")
    req.messages = [_parse_message(m, i) for i, m in enumerate(messages)]
    for name in ("functions", "function_call"):
        if body.get(name) is not None:
            raise bad_request(f"'{name}' is OpenAI's deprecated form of tool calling; send 'tools' (and "
                              "'tool_choice') instead.", name)
    req.tools = _tools(body.get("tools"))
    req.tool_choice = _tool_choice(body.get("tool_choice"), req.tools)
    ptc = body.get("parallel_tool_calls")
    req.parallel_tool_calls = True if ptc is None else _bool(body, "parallel_tool_calls")
    req.thinking = _thinking(body)
    if body.get("logprobs"):
        raise bad_request("'logprobs' is not supported by this server.", "logprobs")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad_request("Only response_format {'type': 'text'} is supported by this server.", "response_format")
    return req


def parse_completion_request(body: dict[str, Any]) -> CompletionRequest:
    req = CompletionRequest()
    _parse_common(body, req)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one, as the openai client sends it for a single prompt
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("'prompt' is empty: send some text to continue.", "prompt")
        req.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                     for t in prompt):
        req.prompt = list(prompt)
    elif prompt is None:
        raise bad_request("Missing required parameter: 'prompt'.", "prompt")
    else:
        raise bad_request("'prompt' must be a non-empty string or a list of token ids; several prompts in one "
                          "request are not supported, send one request each.", "prompt")
    req.echo = _bool(body, "echo")
    if body.get("suffix"):
        raise bad_request("'suffix' is not supported by this server.", "suffix")
    if body.get("best_of") not in (None, 1):
        raise bad_request("Only best_of=1 is supported by this server.", "best_of")
    if body.get("logprobs") not in (None, 0):
        raise bad_request("'logprobs' is not supported by this server.", "logprobs")
    return req


def _parse_common(body: dict[str, Any], req: CommonRequest) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request(f"Invalid type for 'model': expected a string, but got {_json_type(model)} instead.", "model")
    req.model = model
    if body.get("max_tokens") is not None:
        req.max_tokens = _int(body, "max_tokens", minimum=1)
    req.temperature = _number(body, "temperature", 0.0, 2.0)
    req.top_p = _number(body, "top_p", 0.0, 1.0)
    if req.top_p == 0.0:
        raise bad_request("'top_p' must be greater than 0.", "top_p")
    if body.get("top_k") is not None:
        top_k = _int(body, "top_k", minimum=-1)
        req.top_k = 0 if top_k == -1 else top_k  # vLLM's -1 means off as well
    req.min_p = _number(body, "min_p", 0.0, 1.0)
    req.repetition_penalty = _number(body, "repetition_penalty", 0.01, 10.0)
    req.presence_penalty = _number(body, "presence_penalty", -2.0, 2.0) or 0.0
    req.frequency_penalty = _number(body, "frequency_penalty", -2.0, 2.0) or 0.0
    if body.get("seed") is not None:
        req.seed = _int(body, "seed")
    req.stop = _stop(body.get("stop"))
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request(f"Only n=1 is supported by this server, got n={n!r}: send {n} requests instead.", "n")
    if body.get("logit_bias"):
        raise bad_request("'logit_bias' is not supported by this server.", "logit_bias")
    req.stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad_request("'stream_options' must be an object.", "stream_options")
        if not req.stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true.", "stream_options")
        req.include_usage = bool(opts.get("include_usage", False))
    req.ignore_eos = _bool(body, "ignore_eos")


def _tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI's function tools, in the shape the chat templates take; names and schemas are checked again where
    the prompt is built (chat_prompt.check_tools), which the route answers with a 400 too."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad_request(f"Invalid type for 'tools': expected an array, but got {_json_type(tools)} instead.",
                          "tools")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request(f"Invalid value for '{where}': only function tools are supported, e.g. "
                              '{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}.',
                              where)
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"Missing required parameter: '{where}.function.name'.", f"{where}.function")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise bad_request(f"Invalid type for '{where}.function.parameters': expected a JSON Schema object, but "
                              f"got {_json_type(fn['parameters'])} instead.", f"{where}.function.parameters")
        clean = {k: v for k, v in fn.items() if k in ("name", "description", "parameters") and v is not None}
        out.append({"type": "function", "function": clean})
    return out


def _tool_choice(choice: Any, tools: list[dict[str, Any]]) -> str:
    names = [t["function"]["name"] for t in tools]
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request("Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
                              '{"type": "function", "function": {"name": "..."}}.', "tool_choice")
        if fn["name"] not in names:
            known = ", ".join(repr(n) for n in names) or "none were sent"
            raise bad_request(f"Invalid value for 'tool_choice': the function {fn['name']!r} is not among "
                              f"'tools' ({known}).", "tool_choice")
        return fn["name"]
    if choice not in ("none", "auto", "required"):
        raise bad_request(f"Invalid value for 'tool_choice': {choice!r}. Expected 'none', 'auto', 'required' or "
                          '{"type": "function", "function": {"name": "..."}}.', "tool_choice")
    if choice == "required" and not tools:
        raise bad_request("'tool_choice' is 'required' but no 'tools' were sent: send the tools the model may "
                          "call.", "tool_choice")
    return "none" if not tools else str(choice)


# vLLM's chat_template_kwargs: options passed to the chat template. Only these are read by Qwen's templates.
TEMPLATE_KWARGS = ("enable_thinking",)


def _thinking(body: dict[str, Any]) -> bool | None:
    """Qwen3's thinking switch, from vLLM's `chat_template_kwargs: {"enable_thinking": ...}` or a top-level
    `enable_thinking` (DashScope's spelling)."""
    kwargs = body.get("chat_template_kwargs")
    found: bool | None = None
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise bad_request(f"Invalid type for 'chat_template_kwargs': expected an object, but got "
                              f"{_json_type(kwargs)} instead.", "chat_template_kwargs")
        unknown = sorted(set(kwargs) - set(TEMPLATE_KWARGS))
        if unknown:
            raise bad_request(f"Unknown chat_template_kwargs: {', '.join(map(repr, unknown))}. This server passes "
                              f"only {', '.join(map(repr, TEMPLATE_KWARGS))} to the chat template (e.g. "
                              '{"enable_thinking": false} to switch off Qwen3\'s thinking).', "chat_template_kwargs")
        if kwargs.get("enable_thinking") is not None:
            if not isinstance(kwargs["enable_thinking"], bool):
                raise bad_request("Invalid type for 'chat_template_kwargs.enable_thinking': expected a boolean, but "
                                  f"got {_json_type(kwargs['enable_thinking'])} instead.", "chat_template_kwargs")
            found = kwargs["enable_thinking"]
    if body.get("enable_thinking") is not None:
        top = _bool(body, "enable_thinking")
        if found is not None and found != top:
            raise bad_request("'enable_thinking' and 'chat_template_kwargs.enable_thinking' disagree; send one.",
                              "enable_thinking")
        found = top
    return found


def _parse_message(m: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad_request(f"Invalid type for '{where}': expected an object, but got {_json_type(m)} instead.", where)
    role = m.get("role")
    if not isinstance(role, str):
        raise bad_request(f"Missing required parameter: '{where}.role'.", f"{where}.role")
    role = ROLE_ALIASES.get(role, role)
    if role not in CHAT_ROLES:
        raise bad_request(f"Invalid value for '{where}.role': {role!r}. This model's chat template renders only "
                          f"the roles {', '.join(CHAT_ROLES)} (and 'developer' as system).", f"{where}.role")
    content = m.get("content")
    calls = m.get("tool_calls")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"'{where}.content[{j}]' is not a text part: this model reads text only.",
                                  f"{where}.content")
            parts.append(part["text"])
        content = "".join(parts)
    if content is None and role == "assistant":
        content = ""  # a turn that only called tools has content null
    if not isinstance(content, str):
        raise bad_request(f"Invalid type for '{where}.content': expected a string or an array of text parts, "
                          f"but got {_json_type(content)} instead.", f"{where}.content")
    out: dict[str, Any] = {"role": role, "content": content}
    if calls is not None and calls != []:
        if role != "assistant":
            raise bad_request(f"'{where}' has tool_calls, which only an assistant message may have.",
                              f"{where}.tool_calls")
        out["tool_calls"] = _message_tool_calls(calls, where)
    if role == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str):
            raise bad_request(f"Missing required parameter: '{where}.tool_call_id' (the id of the call this message "
                              "answers).", f"{where}.tool_call_id")
        out["tool_call_id"] = call_id
        if isinstance(m.get("name"), str):
            out["name"] = m["name"]
    return out


def _message_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant's earlier calls as the client sends them back: arguments as a JSON string (OpenAI's shape)
    or an object, both rendered as the object the model wrote."""
    if not isinstance(calls, list):
        raise bad_request(f"Invalid type for '{where}.tool_calls': expected an array, but got {_json_type(calls)} "
                          "instead.", f"{where}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"Invalid value for '{at}': expected "
                              '{"id": "...", "type": "function", "function": {"name": "...", "arguments": "{...}"}}.',
                              at)
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as exc:
                raise bad_request(f"'{at}.function.arguments' is not valid JSON ({exc.msg}): send the arguments "
                                  "the model wrote, as a JSON object's text.", f"{at}.function.arguments") from None
        if not isinstance(args, dict):
            raise bad_request(f"'{at}.function.arguments' must be a JSON object (or its text), not "
                              f"{_json_type(args)}.", f"{at}.function.arguments")
        item: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            item["id"] = call["id"]
        out.append(item)
    return out


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad_request("'stop' must be a string or an array of strings.", "stop")
    if len(items) > 16:
        raise bad_request(f"'stop' has {len(items)} strings; at most 16 are allowed.", "stop")
    return tuple(s for s in items if s)


def _number(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad_request(f"Invalid type for '{name}': expected a number, but got {_json_type(v)} instead.", name)
    if not lo <= v <= hi:
        raise bad_request(f"Invalid value for '{name}': {v} is outside [{lo:g}, {hi:g}].", name)
    return float(v)


def _int(body: dict[str, Any], name: str, minimum: int | None = None) -> int:
    v = body.get(name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_request(f"Invalid type for '{name}': expected an integer, but got {_json_type(v)} instead.", name)
    if minimum is not None and v < minimum:
        raise bad_request(f"Invalid value for '{name}': {v} is below the minimum of {minimum}.", name)
    return v


def _bool(body: dict[str, Any], name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad_request(f"Invalid type for '{name}': expected a boolean, but got {_json_type(v)} instead.", name)
    return v


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(v), type(v).__name__)


# ---- responses ------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def tool_call(call_id: str, name: str, arguments: dict[str, Any], index: int | None = None) -> dict[str, Any]:
    """A call as OpenAI sends it: the arguments as JSON text. Streamed calls carry their index in the list too."""
    out: dict[str, Any] = {} if index is None else {"index": index}
    out.update({"id": call_id, "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return out


def chat_completion(rid: str, model: str, text: str | None, finish_reason: str, use: dict[str, int],
                    reasoning: str | None = None, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`reasoning` goes in `reasoning_content`, the field vLLM uses for Qwen3's thinking; the content is null
    when the reply was only tool calls, as OpenAI sends it."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    body: dict[str, Any] = {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": use, "system_fingerprint": None,
    }
    return body


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None,
               include_usage: bool) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def text_completion(rid: str, model: str, text: str, finish_reason: str, use: dict[str, int]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": use, "system_fingerprint": None,
    }
    return body


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None,
                     include_usage: bool) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, obj: str, model: str, created: int, use: dict[str, int]) -> dict[str, Any]:
    """The extra last chunk OpenAI sends when stream_options.include_usage is set: no choices, only usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None,
            "choices": [], "usage": use}


def models_list(names: list[str], created: int, owned_by: str = "qwenbook") -> dict[str, Any]:
    return {"object": "list", "data": [model_card(n, created, owned_by) for n in names]}


def model_card(name: str, created: int, owned_by: str = "qwenbook") -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by}
