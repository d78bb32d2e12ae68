"""Tool calling and reasoning through the OpenAI-compatible server, driven by the official `openai` client.

The model is the tiny Qwen2 trained to call a calculator (tool_model.py): greedy decoding writes a real
`<tool_call>` block, which the server must hand back as OpenAI's tool_calls, whole and streamed. Served with
Qwen3's template the same weights think first, which must come back as reasoning_content. Prompts are checked
against transformers' apply_chat_template with the same tools through the prompt's token count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import tool_model as tm
from qwenbook_bridge.openai.server import OpenAIServer, ServeConfig

NAME = "calc"
GREEDY: dict[str, Any] = {"model": NAME, "temperature": 0, "max_tokens": 40}
CALL = {"expression": "17*23"}


@pytest.fixture(scope="module")
def calc_dir(tiny_model_dir: Path) -> Path:
    return tm.build(tiny_model_dir.parent, base=tiny_model_dir)


@pytest.fixture(scope="module")
def calc(calc_dir: Path):
    from qwenbook_bridge.engine import LoadOptions, load_model

    return load_model(str(calc_dir), LoadOptions(dtype="fp32", device="cpu"))


@pytest.fixture(scope="module")
def server(calc):
    srv = OpenAIServer.for_loaded(calc, ServeConfig(port=0, model_name=NAME))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def qwen3_server(calc, calc_dir: Path):
    """The same weights behind Qwen3's template, which thinks before it calls."""
    tok = tm.qwen3_tokenizer(calc_dir)
    srv = OpenAIServer(calc.model, tok, ServeConfig(port=0, model_name=NAME), eos_token_ids=calc.eos_token_ids)
    srv.start()
    yield srv
    srv.stop()


def client_for(srv: OpenAIServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return client_for(server)


def template_tokens(tok: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    suffix: str = "", **kw: Any) -> int:
    """The prompt's length as transformers renders it with the same arguments."""
    text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False, **kw)
    return len(tok(text + suffix, add_special_tokens=False)["input_ids"])


def with_dict_arguments(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Transformers' templates write an assistant call's arguments with tojson, so they take the object."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "content": "", "tool_calls": [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]]}
        out.append(m)
    return out


def test_the_model_calls_the_tool_and_the_prompt_is_the_templates_own(calc, client):
    request = {"messages": tm.question(), "tools": [tm.CALCULATOR], **GREEDY}
    r = client.chat.completions.create(**request)
    print(f"transcript (python openai, whole)\nrequest: {json.dumps(request)}\nresponse: {r.model_dump_json()}")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and getattr(choice.message, "reasoning_content", None) is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == CALL
    assert r.usage.prompt_tokens == template_tokens(calc.tokenizer, tm.question(), [tm.CALCULATOR])
    assert r.usage.prompt_tokens > template_tokens(calc.tokenizer, tm.question()) + 50  # the tools are in it


def test_a_streamed_call_is_accumulated_by_the_clients_stream_helper(client):
    with client.chat.completions.stream(messages=tm.question(), tools=[tm.CALCULATOR], **GREEDY) as stream:
        chunks = [e.chunk for e in stream if e.type == "chunk"]
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert call.function.name == "calculator" and json.loads(call.function.arguments) == CALL
    assert final.choices[0].finish_reason == "tool_calls"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    firsts = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert len(firsts) == 1 and firsts[0].index == 0 and firsts[0].id == call.id and firsts[0].type == "function"
    # no piece of the <tool_call> block leaks into the streamed text
    assert "".join(d.content or "" for d in deltas) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_tool_results_and_earlier_calls_render_and_get_the_final_answer(calc, client):
    conversation = tm.follow_up()
    r = client.chat.completions.create(messages=conversation, tools=[tm.CALCULATOR], **GREEDY)
    assert r.choices[0].message.content == tm.FINAL and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.tool_calls is None
    assert r.usage.prompt_tokens == template_tokens(calc.tokenizer, with_dict_arguments(conversation),
                                                    [tm.CALCULATOR])
    streamed = client.chat.completions.create(messages=conversation, tools=[tm.CALCULATOR], stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == tm.FINAL


def test_tool_choice_none_keeps_the_tools_out_of_the_prompt(calc, client):
    r = client.chat.completions.create(messages=tm.question(), tools=[tm.CALCULATOR], tool_choice="none",
                                       **{**GREEDY, "max_tokens": 8})
    assert r.usage.prompt_tokens == template_tokens(calc.tokenizer, tm.question())
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls"


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "calculator"}}, "required"])
def test_a_forced_tool_choice_opens_the_call_in_the_prompt(calc, client, choice):
    named = isinstance(choice, dict)
    opened = '<tool_call>\n{"name": "' + ('calculator", "arguments": ' if named else "")
    r = client.chat.completions.create(messages=tm.question(), tools=[tm.CALCULATOR], tool_choice=choice, **GREEDY)
    assert r.usage.prompt_tokens == template_tokens(calc.tokenizer, tm.question(), [tm.CALCULATOR], opened)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "calculator" and json.loads(call.function.arguments) == CALL
    assert r.choices[0].finish_reason == "tool_calls"


def test_a_malformed_call_comes_back_as_text_not_an_error(client):
    # Cut off inside the call: the block never closes, so its text is the answer and nothing fails.
    r = client.chat.completions.create(messages=tm.question(), tools=[tm.CALCULATOR], **{**GREEDY, "max_tokens": 8})
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content.startswith('<tool_call>\n{"name": ')
    streamed = client.chat.completions.create(messages=tm.question(), tools=[tm.CALCULATOR], stream=True,
                                              **{**GREEDY, "max_tokens": 8})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == choice.message.content


def test_reasoning_comes_back_as_reasoning_content_whole_and_streamed(qwen3_server):
    client = client_for(qwen3_server)
    r = client.chat.completions.create(messages=tm.question(), tools=[tm.CALCULATOR], **{**GREEDY, "max_tokens": 60})
    message = r.choices[0].message
    assert message.reasoning_content == tm.REASONING  # type: ignore[attr-defined]
    assert message.content is None and r.choices[0].finish_reason == "tool_calls"
    assert json.loads(message.tool_calls[0].function.arguments) == CALL
    request = {"messages": tm.question(), "tools": [tm.CALCULATOR], "stream": True, **GREEDY, "max_tokens": 60}
    chunks = list(client.chat.completions.create(**request))
    print(f"transcript (python openai, streamed, Qwen3 template)\nrequest: {json.dumps(request)}\nchunks:\n" +
          "\n".join(c.model_dump_json(exclude_none=True) for c in chunks))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == tm.REASONING
    assert "".join(d.content or "" for d in deltas) == ""
    assert [tc.function.name for d in deltas for tc in (d.tool_calls or [])] == ["calculator"]


def test_enable_thinking_false_renders_the_empty_block_and_answers_without_reasoning(qwen3_server):
    client = client_for(qwen3_server)
    tok = qwen3_server.api.tokenizer
    for extra in ({"chat_template_kwargs": {"enable_thinking": False}}, {"enable_thinking": False}):
        r = client.chat.completions.create(messages=tm.question(), tools=[tm.CALCULATOR], extra_body=extra,
                                           **GREEDY)
        assert r.usage.prompt_tokens == template_tokens(tok, tm.question(), [tm.CALCULATOR], enable_thinking=False)
        assert getattr(r.choices[0].message, "reasoning_content", None) is None
        assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == CALL
    on = client.chat.completions.create(messages=tm.question(), tools=[tm.CALCULATOR], max_tokens=1, model=NAME,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert on.usage.prompt_tokens == template_tokens(tok, tm.question(), [tm.CALCULATOR])


@pytest.mark.parametrize("extra, param, words", [
    ({"chat_template_kwargs": {"add_vision_id": True}}, "chat_template_kwargs", "Unknown chat_template_kwargs"),
    ({"chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs", "expected a boolean"),
    ({"tool_choice": "required"}, "tool_choice", "no 'tools'"),
    ({"tools": [tm.CALCULATOR], "tool_choice": {"type": "function", "function": {"name": "weather"}}},
     "tool_choice", "not among 'tools'"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]", "only function tools"),
    ({"tools": [{"type": "function", "function": {"name": "two words"}}]}, "tools", "letters, digits"),
    ({"functions": [tm.CALCULATOR["function"]]}, "functions", "send 'tools'"),
    ({"messages": [{"role": "tool", "content": "391"}]}, "messages[0].tool_call_id", "tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}, {"role": "assistant", "content": None,
      "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": "{17*23"}}]}]},
     "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
])
def test_bad_tool_requests_are_400s_that_say_what_to_send(server, extra, param, words):
    resp = httpx.post(server.url + "/chat/completions", json={"model": NAME, "messages": tm.question(), **extra},
                      timeout=60)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_parallel_tool_calls_false_keeps_the_first_call_only(calc):
    from qwenbook_bridge.engine.generate.chat_prompt import check_messages, check_tools, render_chat
    from qwenbook_bridge.openai.routes import _ChatReply
    from qwenbook_bridge.openai.schema import parse_chat_request

    two = tm.CALL_TEXT + "\n" + tm.CALL_TEXT.replace("17*23", "1+1")
    prompt = render_chat(calc.tokenizer, NAME, check_messages(tm.question()), tools=check_tools([tm.CALCULATOR]))
    for parallel, expressions in ((True, ["17*23", "1+1"]), (False, ["17*23"])):
        req = parse_chat_request({"messages": tm.question(), "tools": [tm.CALCULATOR],
                                  "parallel_tool_calls": parallel})
        reply = _ChatReply(prompt, req)
        deltas = reply.push(two) + reply.flush()
        assert [json.loads(c["function"]["arguments"])["expression"] for c in reply.message_calls()] == expressions
        assert [d["tool_calls"][0]["index"] for d in deltas if "tool_calls" in d] == list(range(len(expressions)))
        assert reply.finish_reason("stop") == "tool_calls" and reply.finish_reason("length") == "length"
