"""One set of options and one sampler for every decode loop (engine/generate/sampling.py): the plain loop, the fast
decoder and the batch engines give the same tokens for the same seed; a bad option is refused with the same words
on the notebook path and, in the OpenAI API's spelling, on the HTTP path; top-k, top-p and min-p cut where they
should; a batch of rows with their own settings and seeds draws in one call what each row draws alone."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

from qwenbook_bridge.engine.errors import InvalidOptionError
from qwenbook_bridge.engine.generate.batching.scheduler import BatchScheduler
from qwenbook_bridge.engine.generate.decoders import _decoders, forget
from qwenbook_bridge.engine.generate.fast_decode import FastDecoder
from qwenbook_bridge.engine.generate.generation import generate, prompt_ids
from qwenbook_bridge.engine.generate.paged.scheduler import EngineConfig, PagedEngine
from qwenbook_bridge.engine.generate.sampling import (NO_CUT, SamplingParams, filtered_probs, hash_uniforms,
    make_sampler, request_generator, sample_batch, sample_rows, sample_tokens)
from qwenbook_bridge.handlers.context import JobContext
from qwenbook_bridge.handlers.dispatch import Handlers
from qwenbook_bridge.openai.server import OpenAIServer, ServeConfig
from qwenbook_bridge.protocol import exception_content, make_message

CHAT = [{"role": "user", "content": "Tell me about the moon."}]
KEY = "sk-sampling"


# ---- (a) every decode loop, the same tokens ---------------------------------------------------------------

@pytest.fixture(scope="module")
def scheduler(tiny):
    s = BatchScheduler(tiny.model, tiny.tokenizer, eos_token_ids=tiny.eos_token_ids)
    s.start()
    yield s
    s.stop()


def on_every_path(tiny, scheduler, params: SamplingParams, monkeypatch) -> dict[str, list[int]]:
    """The reply's tokens from the plain loop, the fast decoder (checked to be the one used) and the scheduler."""
    forget(tiny.model)
    monkeypatch.setenv("QWENBOOK_FAST_DECODE", "0")
    plain = generate(tiny, CHAT, params).token_ids
    monkeypatch.setenv("QWENBOOK_FAST_DECODE", "1")
    try:
        fast = generate(tiny, CHAT, params).token_ids
        assert isinstance(_decoders.get(tiny.model), FastDecoder)
    finally:
        forget(tiny.model)
    batched = list(scheduler.submit(prompt_ids(tiny, CHAT), params).result(120).token_ids)
    return {"plain": plain, "fast": fast, "batch": batched}


@pytest.mark.parametrize("options", [
    dict(temperature=0.9, top_p=0.9, top_k=40, seed=1234),
    dict(temperature=1.3, top_p=1.0, top_k=0, seed=7),
    dict(seed=99),  # the notebook's defaults: temperature 0.7, top_p 0.8, top_k 20
    dict(temperature=1.5, top_p=1.0, top_k=0, min_p=0.1, seed=3),
], ids=["nucleus-and-top-k", "full-distribution", "defaults", "min-p"])
def test_a_seeded_request_gives_the_same_tokens_on_every_path(tiny, scheduler, monkeypatch, options):
    params = SamplingParams(max_tokens=24, **options)
    replies = on_every_path(tiny, scheduler, params, monkeypatch)
    assert replies["plain"] == replies["fast"] == replies["batch"], replies
    greedy = generate(tiny, CHAT, SamplingParams(max_tokens=24, greedy=True)).token_ids
    assert replies["plain"] != greedy  # the reply was sampled, not the argmax


def test_greedy_and_temperature_zero_give_the_argmax_on_every_path(tiny, scheduler, monkeypatch):
    by_flag = on_every_path(tiny, scheduler, SamplingParams(max_tokens=16, greedy=True, temperature=1.5), monkeypatch)
    by_zero = on_every_path(tiny, scheduler, SamplingParams(max_tokens=16, temperature=0.0), monkeypatch)
    assert len({tuple(t) for t in (*by_flag.values(), *by_zero.values())}) == 1


def test_another_seed_gives_another_reply(tiny, monkeypatch):
    monkeypatch.setenv("QWENBOOK_FAST_DECODE", "0")
    first = generate(tiny, CHAT, SamplingParams(max_tokens=24, temperature=1.3, top_k=0, top_p=1.0, seed=1))
    again = generate(tiny, CHAT, SamplingParams(max_tokens=24, temperature=1.3, top_k=0, top_p=1.0, seed=1))
    other = generate(tiny, CHAT, SamplingParams(max_tokens=24, temperature=1.3, top_k=0, top_p=1.0, seed=2))
    assert first.token_ids == again.token_ids != other.token_ids


# ---- (b) one refusal, in each caller's spelling -----------------------------------------------------------

BAD = [  # field, bad value, the notebook API's name for it
    ("max_tokens", 0, "maxTokens"),
    ("temperature", -0.5, "temperature"),
    ("top_p", 1.5, "topP"),
    ("top_k", -2, "topK"),
    ("min_p", 1.5, "minP"),
    ("min_p", -0.1, "minP"),
    ("repetition_penalty", 0.0, "repetitionPenalty"),
    ("presence_penalty", 2.5, "presencePenalty"),
    ("stop", [""], "stop"),
    ("seed", 2**64, "seed"),
]


@pytest.mark.parametrize("field, value, notebook_name", BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_a_refusal_names_the_option_as_its_caller_spells_it(field, value, notebook_name):
    with pytest.raises(InvalidOptionError) as notebook:
        SamplingParams(**{field: value})
    with pytest.raises(InvalidOptionError) as openai:
        SamplingParams.from_openai(**{field: value})
    assert str(notebook.value).startswith(f"{notebook_name} must be ")
    assert str(openai.value).startswith(f"{field} must be ")
    assert str(openai.value) == str(notebook.value).replace(notebook_name, field, 1)
    assert repr(value) in str(notebook.value)


@pytest.fixture(scope="module")
def handlers_and_model(tiny_model_dir):
    handlers = Handlers("cpu")
    load = make_message("load", {"model": str(tiny_model_dir), "dtype": "fp32"}, "s")
    model_id = handlers.load(JobContext(load, threading.Event(), lambda *_: None))["model"]["model_id"]
    yield handlers, model_id
    handlers.close()


def notebook_generate(handlers: Handlers, content: dict) -> dict:
    """The worker's `generate` request, as a notebook sends it, and the reply the worker would send back."""
    msg = make_message("generate", content, "s")
    try:
        return handlers.generate(JobContext(msg, threading.Event(), lambda *_: None))
    except Exception as e:  # what the worker does with a failed job
        return exception_content(e)


@pytest.fixture(scope="module")
def server(tiny):
    srv = OpenAIServer.for_loaded(tiny, ServeConfig(port=0, api_key=KEY, model_name="tiny"))
    srv.start()
    yield srv
    srv.stop()


def http_chat(server, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + "/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_the_notebook_and_the_http_server_refuse_a_bad_seed_in_the_same_words(handlers_and_model, server):
    handlers, model_id = handlers_and_model
    seed = 2**64  # the protocol and the OpenAI body both take any integer; the sampler's generator does not
    reply = notebook_generate(handlers, {"model_id": model_id, "messages": CHAT, "max_tokens": 4, "seed": seed})
    assert reply["ename"] == "InvalidOptionError"
    assert reply["evalue"] == f"seed must be an integer that fits in 64 bits, got {seed}"
    status, body = http_chat(server, {"model": "tiny", "messages": CHAT, "max_tokens": 4, "seed": seed})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"] == reply["evalue"]


def test_the_notebook_request_builds_its_options_from_its_fields(handlers_and_model):
    handlers, model_id = handlers_and_model
    reply = notebook_generate(handlers, {"model_id": model_id, "messages": CHAT, "max_tokens": 4, "top_p": 1.5})
    assert (reply["ename"], reply["evalue"]) == ("InvalidOptionError", "topP must be in (0, 1], got 1.5")
    reply = notebook_generate(handlers, {"model_id": model_id, "messages": CHAT, "max_tokens": 4, "min_p": 1.5})
    assert (reply["ename"], reply["evalue"]) == ("InvalidOptionError",
                                                 "minP must be in [0, 1] (0 turns it off), got 1.5")
    fields = {"max_tokens": 12, "temperature": 1.1, "top_p": 0.95, "top_k": 30, "min_p": 0.05, "stop": ["\n\n"],
              "seed": 5}
    reply = notebook_generate(handlers, {"model_id": model_id, "messages": CHAT, **fields})
    loaded = handlers.registry.get(model_id)
    assert reply["token_ids"] == generate(loaded, CHAT, SamplingParams(**fields)).token_ids


def test_the_openai_body_takes_vllms_min_p():
    from qwenbook_bridge.openai.schema import OpenAIError, parse_chat_request

    assert parse_chat_request({"messages": CHAT, "min_p": 0.1}).min_p == 0.1
    assert parse_chat_request({"messages": CHAT}).min_p is None  # the model's default
    with pytest.raises(OpenAIError) as err:
        parse_chat_request({"messages": CHAT, "min_p": 1.5})
    assert (err.value.param, str(err.value)) == ("min_p", "Invalid value for 'min_p': 1.5 is outside [0, 1].")


def test_the_http_server_keeps_openais_temperature_limit(server):
    # The engine takes any temperature >= 0; OpenAI's API stops at 2, and so does its server here.
    SamplingParams(temperature=3.0)
    status, body = http_chat(server, {"model": "tiny", "messages": CHAT, "max_tokens": 4, "temperature": 3})
    assert status == 400 and body["error"]["param"] == "temperature"
    assert body["error"]["message"] == "Invalid value for 'temperature': 3 is outside [0, 2]."


# ---- (c) the cuts, on hand-made logits --------------------------------------------------------------------

PROBS = [0.5, 0.25, 0.125, 0.125]  # powers of two: softmax and its running sum are exact in float32


def kept(probs: list[float], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> list[float]:
    """Each token's probability after the cuts (by token id, not renormalised after top-p), 0 where cut."""
    logits = torch.tensor([probs]).log()
    out, order = filtered_probs(logits, torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([top_p]))
    by_id = torch.empty_like(out).scatter_(-1, order, out)
    return [round(p, 6) for p in by_id[0].tolist()]


def test_top_p_keeps_the_smallest_prefix_that_reaches_it_boundary_included():
    assert kept(PROBS, top_p=1.0) == PROBS
    # 0.5 + 0.25 reaches 0.75 exactly: the third token is not needed, so it goes (>= at the boundary).
    assert kept(PROBS, top_p=0.75) == [0.5, 0.25, 0.0, 0.0]
    assert kept(PROBS, top_p=0.7500001) == [0.5, 0.25, 0.125, 0.0]
    assert kept(PROBS, top_p=0.5) == [0.5, 0.0, 0.0, 0.0]
    assert kept(PROBS, top_p=1e-9) == [0.5, 0.0, 0.0, 0.0]  # the most likely token always stays


def test_top_k_cuts_first_and_top_p_reads_the_renormalised_rest():
    assert kept(PROBS, top_k=2) == [round(2 / 3, 6), round(1 / 3, 6), 0.0, 0.0]
    assert kept(PROBS, top_k=1) == [1.0, 0.0, 0.0, 0.0]
    assert kept(PROBS, top_k=4) == kept(PROBS, top_k=1000) == PROBS
    # After top-k 2 the first token holds 2/3 >= 0.6 on its own; over the whole distribution 0.5 would not.
    assert kept(PROBS, top_k=2, top_p=0.6) == [round(2 / 3, 6), 0.0, 0.0, 0.0]
    assert kept(PROBS, top_k=3, top_p=0.6) == [round(0.5 / 0.875, 6), round(0.25 / 0.875, 6), 0.0, 0.0]


def test_temperature_sharpens_before_the_cuts():
    cold = kept(PROBS, temperature=0.5)  # p ** 2, renormalised
    total = sum(p * p for p in PROBS)
    assert cold == [round(p * p / total, 6) for p in PROBS]


def test_draws_stay_inside_the_cut_and_follow_the_seed():
    n = 4000
    logits = torch.tensor(PROBS).log().expand(n, 4).contiguous()

    def draw(seed: int, **cut) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return sample_tokens(logits, torch.full((n,), cut.get("temperature", 1.0)),
                             torch.full((n,), cut.get("top_k", 0)), torch.full((n,), cut.get("top_p", 1.0)), generator,
                             min_p=torch.full((n,), cut.get("min_p", 0.0)))

    assert set(draw(1, top_p=0.75).tolist()) == {0, 1}
    assert set(draw(1, top_k=3).tolist()) == {0, 1, 2}
    assert set(draw(1, temperature=0.0).tolist()) == {0}
    assert set(draw(1, min_p=0.5).tolist()) == {0, 1}  # 0.125 < 0.5 * 0.5
    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))


def test_a_request_sampler_is_seeded_and_greedy_is_the_argmax():
    logits = torch.tensor(PROBS).log()
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=11)
    first = [int(s(logits)) for s in [make_sampler(params, torch.device("cpu"))] for _ in range(64)]
    second = [int(s(logits)) for s in [make_sampler(params, torch.device("cpu"))] for _ in range(64)]
    assert first == second and len(set(first)) > 1
    argmax = make_sampler(SamplingParams(greedy=True, seed=11), torch.device("cpu"))
    assert {int(argmax(logits)) for _ in range(16)} == {0}


@pytest.mark.parametrize("options", [dict(), dict(top_k=0, top_p=1.0), dict(top_k=0, top_p=0.9),
                                     dict(top_k=50, top_p=0.95, temperature=1.2), dict(top_k=200_000),
                                     dict(top_k=0, top_p=1.0, min_p=0.1), dict(min_p=0.3)],
                         ids=["defaults", "no-cut", "top-p-only", "both", "top-k-beyond-vocab", "min-p", "all"])
def test_a_request_sampler_draws_what_the_cuda_graph_form_draws(options):
    # A request's sampler ranks only the tokens its settings can keep; the CUDA-graph form (the fast decoder's
    # step) sorts the whole vocabulary for per-row settings. Same seed, same logits: the same tokens.
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams(seed=5, **options)
    sampler = make_sampler(params, torch.device("cpu"))
    shortlisted = [int(sampler(logits)) for _ in range(200)]
    draws = request_generator(params, torch.device("cpu"))
    rows = [torch.full((1,), v, dtype=d) for v, d in ((params.temperature, torch.float32),
                                                       (params.top_k, torch.long), (params.top_p, torch.float32))]
    whole = [int(sample_tokens(logits[None], *rows, draws, min_p=torch.full((1,), params.min_p)))
             for _ in range(200)]
    assert shortlisted == whole and len(set(whole)) > 1


# ---- (d) min-p, as transformers defines it ----------------------------------------------------------------

@pytest.mark.parametrize("min_p, top_k, temperature", [(0.05, 0, 1.0), (0.2, 0, 0.7), (0.5, 0, 1.5),
                                                       (0.1, 40, 0.8), (1.0, 0, 1.0)])
def test_min_p_keeps_what_transformers_min_p_warper_keeps(min_p, top_k, temperature):
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper)

    logits = torch.randn(8, 3000, generator=torch.Generator().manual_seed(1)) * 2.5
    hf = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        hf = TopKLogitsWarper(top_k)(None, hf)
    expected = MinPLogitsWarper(min_p)(None, hf).softmax(-1)
    n = logits.shape[0]
    settings = (torch.full((n,), temperature), torch.full((n,), top_k), torch.full((n,), 1.0))
    for shortlist in (None, top_k or NO_CUT):
        probs, ids = filtered_probs(logits, *settings, shortlist=shortlist, min_p=torch.full((n,), min_p))
        by_id = torch.zeros_like(logits).scatter_(-1, ids, probs)
        by_id /= by_id.sum(-1, keepdim=True)
        assert torch.equal(by_id > 0, expected > 0)
        torch.testing.assert_close(by_id, expected)
    # Off, it cuts nothing.
    probs, _ = filtered_probs(logits, settings[0], torch.zeros(n, dtype=torch.long), settings[2], NO_CUT,
                              torch.zeros(n))
    assert bool((probs > 0).all())


# ---- (e) the seeded draw, batched -------------------------------------------------------------------------

def _splitmix_reference(seed: int, step: int, token: int) -> float:
    """hash_uniforms in Python integers: the draw is this function, on any device."""
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    gamma = 0x9E3779B97F4A7C15
    key = mix((mix(seed & mask) + step * gamma) & mask)
    return ((mix((key + (token + 1) * gamma) & mask) >> 41) * 2 + 1) / 2**24


def test_the_hash_uniforms_are_splitmix64_and_look_uniform():
    seeds, steps = [0, 5, -3, 2**63 - 1, -2**63], [0, 1, 7, 100, 2**40]
    ids = torch.tensor([[0, 1, 2, 151_935]] * len(seeds))
    u = hash_uniforms(torch.tensor(seeds), torch.tensor(steps), ids)
    assert u.tolist() == [[_splitmix_reference(s, t, i) for i in (0, 1, 2, 151_935)] for s, t in zip(seeds, steps)]
    # A million draws over 1000 (seed, step) rows and 1000 tokens.
    rows = torch.arange(1000)
    u = hash_uniforms(rows * 7919, rows % 13, torch.arange(1000)[None]).double()
    assert abs(u.mean().item() - 0.5) < 2e-3 and abs(u.var().item() - 1 / 12) < 1e-3
    assert 0 < u.min().item() and u.max().item() < 1
    # Neighbouring seeds, steps and tokens are not correlated.
    assert abs(torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1].item()) < 5e-3
    assert abs(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1].item()) < 5e-3
    buckets = torch.bincount((u.flatten() * 100).long(), minlength=100).double()
    assert ((buckets - 1e4) ** 2 / 1e4).sum().item() < 160  # chi-square, 99 degrees of freedom


def test_the_hashed_draw_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20_000
    logits = probs.log().expand(n, 4).contiguous()
    ones = torch.ones(n)
    tokens = sample_rows(logits, ones, torch.zeros(n, dtype=torch.long), ones, None, torch.arange(n) * 31,
                         torch.zeros(n, dtype=torch.long), NO_CUT)
    assert torch.allclose(torch.bincount(tokens, minlength=4).float() / n, probs, atol=0.015)


ROWS = [  # a batch with every kind of cut, a greedy row and two rows that share a seed
    SamplingParams(seed=1),
    SamplingParams(seed=2, temperature=1.2, top_k=5, top_p=1.0),
    SamplingParams(seed=3, temperature=1.0, top_k=0, top_p=1.0),
    SamplingParams(seed=4, temperature=0.9, top_k=0, top_p=0.9),
    SamplingParams(seed=5, greedy=True),
    SamplingParams(seed=6, temperature=1.5, top_k=0, top_p=1.0, min_p=0.05),
    SamplingParams(seed=7, temperature=1.1, top_k=60, top_p=0.95, min_p=0.02),
    SamplingParams(seed=1, temperature=0.0),
    SamplingParams(seed=1, temperature=1.3, top_k=0, top_p=0.97, min_p=0.1),
]


def _columns(rows: list[SamplingParams], step: int) -> list[torch.Tensor]:
    """sample_rows' per-row tensors: temperature, top_k, top_p, min_p, seed, step."""
    return [torch.tensor([0.0 if p.is_greedy else p.temperature for p in rows]), torch.tensor([p.top_k for p in rows]),
            torch.tensor([p.top_p for p in rows]), torch.tensor([p.min_p for p in rows]),
            torch.tensor([p.seed for p in rows]), torch.full((len(rows),), step)]


def _alone(logits: torch.Tensor, params: SamplingParams, step: int, shortlist: int | None) -> int:
    return int(sample_rows(logits[None], *_columns([params], step), shortlist))


def test_a_batch_draws_what_each_row_draws_alone_whatever_the_shortlist():
    logits = torch.randn(len(ROWS), 5000, generator=torch.Generator().manual_seed(3)) * 3
    seeds = [p.seed for p in ROWS]
    for step in (0, 1, 17):
        batch = sample_batch(logits, ROWS, seeds, [step] * len(ROWS)).tolist()
        # Each row alone: its cheapest shortlist, and the CUDA-graph form's full sort.
        alone = [_alone(logits[i], p, step, None) for i, p in enumerate(ROWS)]
        cheap = [_alone(logits[i], p, step, p.top_k or (NO_CUT if p.top_p == 1 else None)) for i, p in enumerate(ROWS)]
        assert batch == alone == cheap
        # All rows in one call with per-row tensors (the full sort), and the rows in another order.
        assert sample_rows(logits, *_columns(ROWS, step)).tolist() == batch
        order = list(reversed(range(len(ROWS))))
        shuffled = sample_batch(logits[order], [ROWS[i] for i in order], [seeds[i] for i in order], [step] * len(ROWS))
        assert shuffled.tolist() == [batch[i] for i in order]
    assert (batch[4], batch[7]) == (int(logits[4].argmax()), int(logits[7].argmax()))  # the greedy rows
    # Over steps a row's draws vary, and are its request sampler's draws.
    sampler = make_sampler(ROWS[2], torch.device("cpu"))
    by_sampler = [int(sampler(logits[2])) for _ in range(40)]
    by_batch = [int(sample_batch(logits, ROWS, seeds, [s] * len(ROWS))[2]) for s in range(40)]
    assert by_sampler == by_batch and len(set(by_batch)) > 5


def test_an_unseeded_request_gets_its_own_random_seed():
    a, b = make_sampler(SamplingParams(), torch.device("cpu")), make_sampler(SamplingParams(), torch.device("cpu"))
    assert a.seed != b.seed and make_sampler(SamplingParams(seed=2**64 - 1), torch.device("cpu")).seed == -1


def test_a_seeded_request_draws_the_same_tokens_alone_and_in_a_paged_batch(tiny):
    from qwenbook_bridge.engine.generate.generation import prompt_ids

    questions = ("Tell me about the moon.", "写一首关于秋天的诗", "Count to ten")
    chats = [[{"role": "user", "content": q}] for q in questions]
    prompts = [prompt_ids(tiny, c) for c in chats]
    subject = SamplingParams(max_tokens=20, temperature=1.2, top_p=0.95, top_k=40, min_p=0.02, seed=31)
    others = [SamplingParams(max_tokens=16, temperature=1.0, top_k=0, top_p=0.9, seed=8),  # a full-sort group
              SamplingParams(max_tokens=12, greedy=True, repetition_penalty=1.3)]
    engine = PagedEngine(tiny.model, tiny.tokenizer, EngineConfig(num_blocks=64, block_size=4), tiny.eos_token_ids)
    engine.start()
    try:
        alone = list(engine.submit(prompts[0], subject).result(120).token_ids)
        handles = [engine.submit(p, o) for p, o in zip(prompts[1:], others)]
        batched = list(engine.submit(prompts[0], subject).result(120).token_ids)
        assert all(h.result(120).token_ids for h in handles)
    finally:
        engine.stop()
    assert batched == alone
    assert alone == generate(tiny, chats[0], subject).token_ids  # the plain loop draws the same
    greedy = generate(tiny, chats[0], SamplingParams(max_tokens=20, greedy=True)).token_ids
    assert alone != greedy


def test_the_http_server_samples_with_min_p(server, tiny):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 12, "temperature": 1.5, "seed": 3}
    greedy = generate(tiny, CHAT, SamplingParams(max_tokens=12, greedy=True)).token_ids
    text = lambda b: http_chat(server, b)[1]["choices"][0]["message"]["content"]  # noqa: E731
    # min_p 1 keeps only the most likely token: the reply is the greedy one, whatever the temperature.
    assert text({**body, "min_p": 1.0}) == tiny.tokenizer.decode(greedy, skip_special_tokens=True)
    assert text(body) != text({**body, "min_p": 1.0})
