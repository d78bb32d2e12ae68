from __future__ import annotations

import dataclasses
import functools
import threading
from types import SimpleNamespace

import pytest
import torch

from qwenbook_bridge.engine import SamplingParams, InvalidOptionError, NoChatTemplateError
from qwenbook_bridge.engine.generate.generation import generate
from qwenbook_bridge.engine.generate.generation import prompt_ids
from qwenbook_bridge.engine.generate.streaming import IncrementalDetokenizer, StopStringFilter

PROMPTS = [
    [{"role": "user", "content": "你好，你是谁？"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Count to five."}],
    [{"role": "user", "content": "My name is Lin."}, {"role": "assistant", "content": "Nice to meet you, Lin."},
     {"role": "user", "content": "What is my name?"}],
]
GREEDY = SamplingParams(max_tokens=64, greedy=True)


@pytest.fixture(scope="module")
def paged_engine(tiny):
    from qwenbook_bridge.engine.generate.paged.scheduler import EngineConfig, PagedEngine

    engine = PagedEngine(tiny.model, tiny.tokenizer, EngineConfig(max_batch_size=4, num_blocks=1024,
                                                                  context_length=4096), tiny.eos_token_ids)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(autouse=True, params=["plain", "fast", "engine"])
def decode_loop(request, monkeypatch):
    """Every test runs on each way a reply is decoded: transformers' forward, the fast decoder (on the CPU here),
    and the chat engine (a running PagedEngine passed to generate)."""
    monkeypatch.setenv("QWENBOOK_FAST_DECODE", "1" if request.param == "fast" else "0")
    if request.param == "engine":
        engine = request.getfixturevalue("paged_engine")
        monkeypatch.setitem(globals(), "generate", functools.partial(generate, engine=engine))
    return request.param


def run(tiny, messages, opts=GREEDY, cancel=None):
    deltas = []
    result = generate(tiny, messages, opts, on_token=deltas.append, cancel=cancel)
    return result, deltas


def hf_greedy(tiny, messages, n):
    ids = torch.tensor([prompt_ids(tiny, messages)])
    with torch.inference_mode():
        out = tiny.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("messages", PROMPTS, ids=["chinese", "system", "history"])
def test_greedy_matches_transformers_generate_token_for_token(tiny, messages):
    result, _ = run(tiny, messages)
    expected = hf_greedy(tiny, messages, 64)
    assert len(expected) == 64
    assert result.token_ids == expected
    assert result.finish_reason == "length" and result.completion_tokens == 64


def test_history_and_system_prompt_reach_the_template(tiny):
    text = tiny.tokenizer.decode(prompt_ids(tiny, PROMPTS[2]))
    assert "<|im_start|>user\nMy name is Lin.<|im_end|>" in text
    assert "<|im_start|>assistant\nNice to meet you, Lin.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert "You are Qwen, created by Alibaba Cloud" in text  # the template's default system prompt
    assert "You are a helpful assistant." in tiny.tokenizer.decode(prompt_ids(tiny, PROMPTS[1]))


def test_streamed_deltas_join_to_the_reply_and_carry_every_token(tiny):
    result, deltas = run(tiny, PROMPTS[1])
    assert "".join(d.text for d in deltas) == result.text
    assert [t for d in deltas for t in d.token_ids] == result.token_ids
    assert [d.index for d in deltas] == [sum(len(e.token_ids) for e in deltas[:i]) for i in range(len(deltas))]
    assert result.text == tiny.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert result.prompt_tokens == len(prompt_ids(tiny, PROMPTS[1]))
    assert 0 < result.ttft_ms <= result.duration_ms and result.tokens_per_s > 0


@pytest.mark.parametrize("prompt", ["请用中文写一首关于春天的诗。", "你好，你是谁？"])
def test_a_chinese_reply_never_streams_a_broken_character(tiny, prompt):
    result, deltas = run(tiny, [{"role": "user", "content": prompt}], SamplingParams(max_tokens=64, greedy=True))
    whole = tiny.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in whole)
    # A split character would surface as U+FFFD at the end of a delta and make the joined text differ from the
    # whole decode. (A random model can emit genuinely invalid bytes; those decode to U+FFFD in both.)
    assert not [d.text for d in deltas if d.text.endswith("\ufffd")]
    assert "".join(d.text for d in deltas) == result.text == whole


def _byte_token_ids(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte (GPT-2 byte-to-unicode alphabet), so every CJK character spans three tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b], extra = chr(256 + extra), extra + 1
    return tokenizer.convert_tokens_to_ids([mapping[b] for b in text.encode("utf-8")])


def test_detokenizer_holds_back_partial_multibyte_characters(tiny):
    text = "春眠不觉晓，处处闻啼鸟。😀 ok"
    ids = _byte_token_ids(tiny.tokenizer, text)
    assert len(ids) == len(text.encode("utf-8"))
    detok = IncrementalDetokenizer(tiny.tokenizer)
    deltas = [detok.push(i) for i in ids]
    assert not [d for d in deltas if "\ufffd" in d]
    assert "".join(deltas) + detok.flush() == text
    assert deltas[:3] == ["", "", "春"]


def test_detokenizer_drops_an_incomplete_character_at_the_end(tiny):
    ids = _byte_token_ids(tiny.tokenizer, "a好")[:3]  # "a" and two of the three bytes of 好
    detok = IncrementalDetokenizer(tiny.tokenizer)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == "a"


def test_stop_filter_never_shows_part_of_a_stop_string():
    f = StopStringFilter(["lo w"])
    assert f.push("Hel") == "He"
    assert f.push("lo wor") == "l" and f.hit == "lo w"
    assert f.push("more") == "" and f.flush() == ""
    g = StopStringFilter(["END", "xyz"])
    assert g.push("aEN") == "a"
    assert g.push("d") == "ENd"
    assert g.push("xy") == "" and g.flush() == "xy"


def test_generation_stops_before_a_stop_string(tiny):
    reference, _ = run(tiny, PROMPTS[0])
    stop = reference.text[20:24]
    cut = reference.text.find(stop)
    result, deltas = run(tiny, PROMPTS[0], dataclasses.replace(GREEDY, stop=["never appears", stop]))
    assert result.finish_reason == "stop_string"
    assert result.text == reference.text[:cut]
    assert "".join(d.text for d in deltas) == result.text
    assert result.token_ids == reference.token_ids[:len(result.token_ids)]


def test_text_held_back_for_a_stop_string_that_never_completes_is_shown_at_the_end(tiny):
    reference, _ = run(tiny, PROMPTS[0])
    result, deltas = run(tiny, PROMPTS[0], dataclasses.replace(GREEDY, stop=[reference.text[-3:] + "\u2603"]))
    assert result.finish_reason == "length" and result.text == reference.text
    assert "".join(d.text for d in deltas) == reference.text


def test_max_tokens_bounds_the_reply(tiny):
    reference, _ = run(tiny, PROMPTS[1])
    result, _ = run(tiny, PROMPTS[1], dataclasses.replace(GREEDY, max_tokens=7))
    assert result.finish_reason == "length" and result.completion_tokens == 7
    assert result.token_ids == reference.token_ids[:7]


def test_cancel_stops_at_the_next_token_and_keeps_the_partial_reply(tiny):
    cancel = threading.Event()
    deltas, produced_when_cancelled = [], []

    def on_token(delta):
        deltas.append(delta)
        if len(deltas) == 5:
            cancel.set()
            produced_when_cancelled.append(delta.index + len(delta.token_ids))

    result = generate(tiny, PROMPTS[0], dataclasses.replace(GREEDY, max_tokens=500), on_token=on_token, cancel=cancel)
    assert result.finish_reason == "cancelled"
    assert result.completion_tokens - produced_when_cancelled[0] == 0
    assert result.text == "".join(d.text for d in deltas) and result.text


def test_cancel_before_start_produces_nothing(tiny):
    cancel = threading.Event()
    cancel.set()
    result, deltas = run(tiny, PROMPTS[0], cancel=cancel)
    assert (result.finish_reason, result.completion_tokens, result.text, deltas) == ("cancelled", 0, "", [])


def test_sampling_is_reproducible_with_a_seed_and_degenerates_to_greedy(tiny):
    greedy, _ = run(tiny, PROMPTS[1], dataclasses.replace(GREEDY, max_tokens=16))
    sampled = SamplingParams(max_tokens=16, temperature=1.5, top_p=1.0, top_k=0, seed=123)
    first, _ = run(tiny, PROMPTS[1], sampled)
    second, _ = run(tiny, PROMPTS[1], sampled)
    assert first.token_ids == second.token_ids
    top1, _ = run(tiny, PROMPTS[1], dataclasses.replace(sampled, top_k=1))
    tiny_p, _ = run(tiny, PROMPTS[1], dataclasses.replace(sampled, top_p=1e-9))
    assert top1.token_ids == greedy.token_ids == tiny_p.token_ids


@pytest.mark.parametrize("opts, words", [
    (dict(max_tokens=0), "maxTokens must be at least 1, got 0"),
    (dict(temperature=-1), "temperature must be a number >= 0"),
    (dict(top_p=1.5), "topP must be in (0, 1]"),
    (dict(top_k=-2), "topK must be an integer >= 0"),
    (dict(stop=[""]), "stop must be a list of non-empty strings"),
])
def test_bad_options_are_refused_with_the_option_name(opts, words):
    # Options check themselves when made, so a bad one never reaches a decode loop.
    with pytest.raises(InvalidOptionError) as info:
        SamplingParams(**opts)
    assert words in str(info.value)


def test_bad_messages_and_models_are_refused(tiny):
    with pytest.raises(InvalidOptionError, match=r"messages\[0\] must be"):
        generate(tiny, [{"role": "bot", "content": "hi"}], GREEDY)
    with pytest.raises(InvalidOptionError, match="non-empty list"):
        generate(tiny, [], GREEDY)
    no_template = dataclasses.replace(tiny, tokenizer=SimpleNamespace(chat_template=None))
    with pytest.raises(NoChatTemplateError, match="has no chat template"):
        generate(no_template, PROMPTS[0], GREEDY)
    with pytest.raises(InvalidOptionError, match=r"the prompt is \d+ tokens but .* holds at most 4096"):
        generate(tiny, [{"role": "user", "content": "hello " * 5000}], GREEDY)
