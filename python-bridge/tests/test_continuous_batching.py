"""The batch scheduler on the tiny fp32 model: a request decoded in a batch gives exactly its solo output."""

from __future__ import annotations

import threading

import pytest
import torch

from qwenbook_bridge.engine.generate.batching.requests import Finished, TokenDelta
from qwenbook_bridge.engine.generate.sampling import SamplingParams, apply_penalties
from qwenbook_bridge.engine.generate.batching.scheduler import BatchConfig, BatchScheduler
from qwenbook_bridge.engine.errors import EngineError, InvalidOptionError
from qwenbook_bridge.engine.generate.generation import generate, prompt_ids

QUESTIONS = ["你好", "Who are you?", "写一首关于秋天的诗，要有月亮和桂花。", "1+1=?",
             "Tell me a long story about a cat " * 6, "x", "继续",
             "What is the capital of France? Answer in one word.", "🙂🙂🙂", "def f(x):\n    return"]


def chat(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


@pytest.fixture(scope="module")
def scheduler(tiny):
    s = BatchScheduler(tiny.model, tiny.tokenizer, eos_token_ids=tiny.eos_token_ids)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def solo(tiny):
    """Greedy replies from the engine's single-request decoder, keyed by (question, max_tokens)."""
    cache: dict[tuple[str, int], object] = {}

    def get(q: str, n: int):
        if (q, n) not in cache:
            cache[(q, n)] = generate(tiny, chat(q), SamplingParams(max_tokens=n, greedy=True))
        return cache[(q, n)]

    return get


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def test_a_lone_request_matches_single_request_generation(tiny, scheduler, solo):
    for q in QUESTIONS[:3]:
        ref = solo(q, 20)
        got = scheduler.submit(prompt_ids(tiny, chat(q)), greedy(20)).result(timeout=60)
        assert got.text == ref.text
        assert list(got.token_ids) == ref.token_ids
        assert got.finish_reason == "length" and got.completion_tokens == 20
        assert got.prompt_tokens == ref.prompt_tokens


def test_requests_joining_a_running_batch_match_their_solo_output(tiny, scheduler, solo):
    lengths = [37, 5, 64, 12, 48, 1, 30, 22, 55, 9]
    first = scheduler.submit(prompt_ids(tiny, chat(QUESTIONS[0])), greedy(lengths[0]))
    text, ids, handles = [], [], []
    for ev in first.events(timeout=60):
        if isinstance(ev, TokenDelta):
            text.append(ev.text)
            ids.extend(ev.token_ids)
            if not handles:  # the first request is decoding: the others join a batch that is already running
                handles = [scheduler.submit(prompt_ids(tiny, chat(q)), greedy(n))
                           for q, n in zip(QUESTIONS[1:], lengths[1:])]
    assert ("".join(text), ids) == (solo(QUESTIONS[0], lengths[0]).text, solo(QUESTIONS[0], lengths[0]).token_ids)
    for q, n, h in zip(QUESTIONS[1:], lengths[1:], handles):
        got, ref = h.result(timeout=120), solo(q, n)
        assert (got.text, list(got.token_ids)) == (ref.text, ref.token_ids), q
        assert got.completion_tokens == n
    assert scheduler.stats().peak_batch_size > 1


def test_padding_is_invisible_to_every_row(tiny, solo, monkeypatch):
    """Fill the pad columns of the cache with large noise instead of zeros: if the mask or the positions
    let any row see them, its greedy reply changes. (Zeros alone would hide a missing mask on this model.)"""
    # A from-import: engine/__init__ binds `engine.generate` to the generate() function, which hides the
    # subpackage from a dotted `import ... as` chain.
    from qwenbook_bridge.engine.generate.batching import cache as cb

    real_pad = cb._pad_left
    noise = torch.Generator().manual_seed(0)

    def noisy_pad(t: torch.Tensor, n: int) -> torch.Tensor:
        padded = real_pad(t, n)
        if t.dim() == 4:
            padded[:, :, :n, :] = torch.randn(padded[:, :, :n, :].shape, generator=noise) * 50
        return padded

    monkeypatch.setattr(cb, "_pad_left", noisy_pad)
    s = BatchScheduler(tiny.model, tiny.tokenizer, eos_token_ids=tiny.eos_token_ids)
    s.start()
    try:
        lengths = [40, 25, 33, 18, 29, 12]
        handles = [s.submit(prompt_ids(tiny, chat(q)), greedy(n)) for q, n in zip(QUESTIONS, lengths)]
        for q, n, h in zip(QUESTIONS, lengths, handles):
            assert h.result(timeout=60).token_ids == tuple(solo(q, n).token_ids), q
        assert s.stats().peak_batch_size > 1
    finally:
        s.stop()


def test_queueing_beyond_the_batch_size_keeps_outputs_exact(tiny, solo):
    s = BatchScheduler(tiny.model, tiny.tokenizer, BatchConfig(max_batch_size=2), tiny.eos_token_ids)
    s.start()
    try:
        handles = [s.submit(prompt_ids(tiny, chat(q)), greedy(15)) for q in QUESTIONS[:5]]
        for q, h in zip(QUESTIONS, handles):
            assert h.result(timeout=60).text == solo(q, 15).text
        assert s.stats().peak_batch_size == 2
    finally:
        s.stop()


def test_stop_strings_cut_the_reply_before_them(tiny, scheduler, solo):
    ref = solo(QUESTIONS[1], 30).text
    stop = ref[12:16]
    got = scheduler.submit(prompt_ids(tiny, chat(QUESTIONS[1])), greedy(30, stop=("never appears", stop))).result(60)
    assert got.finish_reason == "stop"
    assert got.text == ref[:ref.index(stop)]
    assert stop not in got.text


def test_end_of_sequence_tokens_stop_a_row_unless_ignored(tiny, solo):
    ref = solo(QUESTIONS[2], 20)
    end = ref.token_ids[6]
    first = ref.token_ids.index(end)
    s = BatchScheduler(tiny.model, tiny.tokenizer, eos_token_ids=frozenset({end}))
    s.start()
    try:
        ids = prompt_ids(tiny, chat(QUESTIONS[2]))
        stopped = s.submit(ids, greedy(20)).result(60)
        ignored = s.submit(ids, greedy(20, ignore_eos=True)).result(60)
    finally:
        s.stop()
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens == first + 1  # the end token is generated, counted, and not shown
    assert stopped.text == tiny.tokenizer.decode(ref.token_ids[:first], skip_special_tokens=True)
    assert ignored.finish_reason == "length" and ignored.text == ref.text


def test_cancelling_one_request_leaves_the_others_running(tiny, scheduler, solo):
    long = scheduler.submit(prompt_ids(tiny, chat(QUESTIONS[3])), greedy(3000))
    short = scheduler.submit(prompt_ids(tiny, chat(QUESTIONS[4])), greedy(40))
    seen = 0
    for ev in long.events(timeout=60):
        seen += isinstance(ev, TokenDelta)
        if seen == 3:
            long.cancel()
        if isinstance(ev, Finished):
            assert ev.finish_reason == "cancelled"
            assert ev.completion_tokens < 3000
            break
    assert short.result(timeout=60).text == solo(QUESTIONS[4], 40).text


def test_seeded_sampling_matches_the_notebook_chat(tiny, scheduler):
    opts = dict(temperature=0.9, top_p=0.9, top_k=40, seed=1234)
    ref = generate(tiny, chat(QUESTIONS[0]), SamplingParams(max_tokens=25, **opts))
    ids = prompt_ids(tiny, chat(QUESTIONS[0]))
    busy = scheduler.submit(prompt_ids(tiny, chat(QUESTIONS[1])), greedy(60))  # a neighbour must not matter
    got = scheduler.submit(ids, SamplingParams(max_tokens=25, **opts)).result(60)
    busy.result(60)
    assert got.text == ref.text
    other = scheduler.submit(ids, SamplingParams(max_tokens=25, **{**opts, "seed": 99})).result(60)
    assert other.text != got.text


def test_penalties_follow_their_definitions():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, 3.0])
    prompt = torch.tensor([0, 1])
    rep = apply_penalties(logits.clone(), SamplingParams(max_tokens=1, repetition_penalty=2.0), prompt, [2])
    assert rep.tolist() == [1.0, -4.0, 0.5, 0.5, 3.0]  # seen: positive divided, negative multiplied
    add = apply_penalties(logits.clone(), SamplingParams(max_tokens=1, presence_penalty=0.5, frequency_penalty=0.25),
                          prompt, [3, 3, 4])
    assert add.tolist() == [2.0, -2.0, 1.0, 0.5 - 0.5 - 0.5, 3.0 - 0.5 - 0.25]  # reply tokens only


def test_penalties_steer_a_greedy_reply(tiny, scheduler, solo):
    ids = prompt_ids(tiny, chat(QUESTIONS[4]))
    plain = solo(QUESTIONS[4], 60)
    assert len(set(plain.token_ids)) == 60
    # Rewarding seen tokens (penalty < 1) pulls the reply towards the prompt's own tokens and repeats them.
    echo = scheduler.submit(ids, greedy(60, repetition_penalty=0.5)).result(60)
    assert len(set(echo.token_ids)) < 60 and set(echo.token_ids) & set(ids)
    repeat = scheduler.submit(ids, greedy(60, frequency_penalty=-2.0)).result(60)
    assert len(set(repeat.token_ids)) < 60


def test_exclusive_parks_the_scheduler_between_steps(tiny, scheduler, solo):
    handle = scheduler.submit(prompt_ids(tiny, chat(QUESTIONS[5])), greedy(200))
    events = handle.events(timeout=60)
    next(events)
    with scheduler.exclusive():
        parked_at = scheduler.stats().steps
        # The notebook may use the model here; the served request does not advance meanwhile.
        own = generate(tiny, chat(QUESTIONS[6]), SamplingParams(max_tokens=10, greedy=True))
        assert scheduler.stats().steps == parked_at
    assert own.text == solo(QUESTIONS[6], 10).text
    rest = [ev for ev in events]
    assert isinstance(rest[-1], Finished) and rest[-1].completion_tokens == 200


def test_call_between_steps_runs_on_the_scheduler_thread(scheduler):
    name = scheduler.call_between_steps(lambda: threading.current_thread().name).result(timeout=30)
    assert name == "qwenbook-batch-scheduler"
    with pytest.raises(ZeroDivisionError):
        scheduler.call_between_steps(lambda: 1 / 0).result(timeout=30)


def test_a_failing_step_ends_its_rows_with_an_error_and_the_scheduler_recovers(tiny, solo):
    s = BatchScheduler(tiny.model, tiny.tokenizer, eos_token_ids=tiny.eos_token_ids)
    calls = {"n": 0}
    real = tiny.model

    class Flaky(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = real
            self.config = real.config

        def forward(self, **kw):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("CUDA out of memory (simulated)")
            return real(**kw)

    s.model = Flaky()
    s.start()
    try:
        failed = s.submit(prompt_ids(tiny, chat(QUESTIONS[0])), greedy(10)).result(60)
        assert failed.finish_reason == "error" and "out of memory" in (failed.error or "")
        assert "out of memory" in (s.stats().last_error or "")
        again = s.submit(prompt_ids(tiny, chat(QUESTIONS[0])), greedy(10)).result(60)
        assert again.text == solo(QUESTIONS[0], 10).text
    finally:
        s.stop()


def test_bad_submissions_are_refused_clearly(tiny, scheduler):
    with pytest.raises(InvalidOptionError, match="context"):
        scheduler.submit([1] * scheduler.context_length, greedy(5))
    with pytest.raises(InvalidOptionError, match="empty"):
        scheduler.submit([], greedy(5))
    with pytest.raises(InvalidOptionError, match="temperature"):
        SamplingParams(max_tokens=5, temperature=-1.0)
    stopped = BatchScheduler(tiny.model, tiny.tokenizer)
    with pytest.raises(EngineError, match="start"):
        stopped.submit([1, 2], greedy(5))


def test_stop_cancels_everything_and_keeps_the_model(tiny, solo):
    s = BatchScheduler(tiny.model, tiny.tokenizer, eos_token_ids=tiny.eos_token_ids)
    s.start()
    running = s.submit(prompt_ids(tiny, chat(QUESTIONS[0])), greedy(3000))
    next(running.events(timeout=60))
    s.stop()
    tail = [ev for ev in running.events(timeout=30)]
    assert isinstance(tail[-1], Finished) and tail[-1].finish_reason == "cancelled"
    after = generate(tiny, chat(QUESTIONS[0]), SamplingParams(max_tokens=8, greedy=True))
    assert after.text == solo(QUESTIONS[0], 8).text
