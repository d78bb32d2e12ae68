"""The reply parser: reasoning, answer and tool calls out of text that arrives cut anywhere."""

from __future__ import annotations

import random

import pytest

from qwenbook_bridge.engine.generate.reply_parts import ReplyParser, parse_tool_call, template_thinks


def run(text: str, cuts: list[int] | None = None, **kw: object) -> tuple[ReplyParser, list[tuple[str, str]]]:
    """Feed `text` in pieces cut at `cuts` (every character when None) and collect what each push handed out."""
    p = ReplyParser(**kw)  # type: ignore[arg-type]
    bounds = [0, *(cuts if cuts is not None else range(1, len(text))), len(text)]
    seen: list[tuple[str, str]] = []
    for lo, hi in zip(bounds, bounds[1:]):
        got = p.push(text[lo:hi])
        seen += [("r", got.reasoning), ("c", got.content)] + [("t", c.name) for c in got.tool_calls]
    got = p.flush()
    seen += [("r", got.reasoning), ("c", got.content)] + [("t", c.name) for c in got.tool_calls]
    return p, [(k, v) for k, v in seen if v]


THOUGHT = "<think>\nThe user greets me.\nI greet back.\n</think>\n\nHello there!"


@pytest.mark.parametrize("cuts", [None, [], [3, 9, 40, 45, 47]])
def test_reasoning_is_split_from_the_answer_however_the_text_is_cut(cuts: list[int] | None) -> None:
    p, seen = run(THOUGHT, cuts, thinking=True)
    assert p.reasoning == "The user greets me.\nI greet back."
    assert p.content == "Hello there!"
    # What was handed out piece by piece adds up to the same parts, reasoning strictly before the answer.
    assert "".join(v for k, v in seen if k == "r") == p.reasoning
    assert "".join(v for k, v in seen if k == "c") == p.content
    kinds = [k for k, _ in seen]
    assert kinds == sorted(kinds, key=lambda k: k != "r")


def test_thinking_switched_off_leaves_an_empty_block_and_no_reasoning() -> None:
    # With enable_thinking=false the template writes the empty block itself; the reply is all answer.
    p, _ = run("Hi!", thinking=True)
    assert (p.reasoning, p.content) == ("", "Hi!")


def test_a_template_without_thinking_never_splits() -> None:
    p, _ = run(THOUGHT, thinking=False)
    assert (p.reasoning, p.content) == ("", THOUGHT)
    assert template_thinks("{{ '<think>' }}") and not template_thinks("{{ messages }}") and not template_thinks(None)


def test_reply_that_starts_inside_the_block_and_one_cut_off_by_the_budget() -> None:
    p, _ = run("still thinking\n</think>\n\nDone.", in_reasoning=True)
    assert (p.reasoning, p.content) == ("still thinking", "Done.")
    p, _ = run("<think>\nweighing the options", thinking=True)
    assert (p.reasoning, p.content) == ("weighing the options", "")


CALLS = ('I will look both up.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "time", "arguments": "{\\"zone\\": \\"CET\\"}"}\n</tool_call>')


@pytest.mark.parametrize("cuts", [None, [], [5, 22, 23, 30, 90, 101]])
def test_tool_calls_are_parsed_and_kept_out_of_the_answer(cuts: list[int] | None) -> None:
    p, seen = run(CALLS, cuts, tools=True)
    assert [(c.name, c.arguments) for c in p.tool_calls] == [("weather", {"city": "Paris"}), ("time", {"zone": "CET"})]
    assert p.content == "I will look both up."
    assert not p.malformed
    assert [v for k, v in seen if k == "t"] == ["weather", "time"]
    assert all(c.id.startswith("call_") for c in p.tool_calls) and p.tool_calls[0].id != p.tool_calls[1].id


def test_without_tools_the_tags_are_answer_text() -> None:
    p, _ = run(CALLS, tools=False)
    assert p.content == CALLS and not p.tool_calls


def test_malformed_call_keeps_its_text_and_says_why() -> None:
    text = 'ok <tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}\n</tool_call>'
    p, _ = run(text, tools=True)
    assert not p.tool_calls
    assert p.content == text  # nothing the model wrote is lost
    assert len(p.malformed) == 1 and "tool call 1 is not valid JSON" in p.malformed[0].error
    # A call the budget cut off is kept as text too.
    p, _ = run('<tool_call>\n{"name": "wea', tools=True)
    assert p.content == '<tool_call>\n{"name": "wea' and "before </tool_call>" in p.malformed[0].error


def test_a_forced_call_continues_the_json_the_prompt_opened() -> None:
    p, _ = run('{"city": "Oslo"}}\n</tool_call>', open_tool_call='\n{"name": "weather", "arguments": ')
    assert [(c.name, c.arguments) for c in p.tool_calls] == [("weather", {"city": "Oslo"})]
    assert p.content == ""


def test_reasoning_then_a_call() -> None:
    text = "<think>\nneed the weather\n</think>\n\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {}}\n</tool_call>"
    for seed in range(5):
        cuts = sorted(random.Random(seed).sample(range(1, len(text)), 12))
        p, _ = run(text, cuts, thinking=True, tools=True)
        assert (p.reasoning, p.content, [c.name for c in p.tool_calls]) == ("need the weather", "", ["weather"])


@pytest.mark.parametrize("body, why", [
    ("[1, 2]", 'not a JSON object with a "name" string'),
    ('{"arguments": {}}', 'not a JSON object with a "name" string'),
    ('{"name": "f", "arguments": [1]}', "is a list, not a JSON object"),
    ('{"name": "f", "arguments": "{oops"}', '"arguments" string is not valid JSON'),
])
def test_parse_tool_call_reasons(body: str, why: str) -> None:
    got = parse_tool_call(body)
    assert isinstance(got, str) and why in got
