"""One set of options and one sampler for every decode loop (engine/generate/sampling.py): the plain loop, the fast
decoder and the batch scheduler give the same tokens for the same seed; a bad option is refused with the same words
on the notebook path and, in the OpenAI API's spelling, on the HTTP path; top-k and top-p cut where they should."""

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
from qwenbook_bridge.engine.generate.sampling import SamplingParams, filtered_probs, make_sampler, sample_tokens
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
], ids=["nucleus-and-top-k", "full-distribution", "defaults"])
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
    ("repetition_penalty", 0.0, "repetitionPenalty"),
    ("presence_penalty", 2.5, "presencePenalty"),
    ("stop", [""], "stop"),
    ("seed", 2**64, "seed"),
]


@pytest.mark.parametrize("field, value, notebook_name", BAD, ids=[b[0] for b in BAD])
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
    fields = {"max_tokens": 12, "temperature": 1.1, "top_p": 0.95, "top_k": 30, "stop": ["\n\n"], "seed": 5}
    reply = notebook_generate(handlers, {"model_id": model_id, "messages": CHAT, **fields})
    loaded = handlers.registry.get(model_id)
    assert reply["token_ids"] == generate(loaded, CHAT, SamplingParams(**fields)).token_ids


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
                             torch.full((n,), cut.get("top_k", 0)), torch.full((n,), cut.get("top_p", 1.0)), generator)

    assert set(draw(1, top_p=0.75).tolist()) == {0, 1}
    assert set(draw(1, top_k=3).tolist()) == {0, 1, 2}
    assert set(draw(1, temperature=0.0).tolist()) == {0}
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
                                     dict(top_k=50, top_p=0.95, temperature=1.2), dict(top_k=200_000)],
                         ids=["defaults", "no-cut", "top-p-only", "both", "top-k-beyond-vocab"])
def test_a_request_sampler_draws_what_the_cuda_graph_form_draws(options):
    # A request's sampler ranks only the tokens its settings can keep; the CUDA-graph form sorts the whole
    # vocabulary for per-row settings. Same seed, same logits: the same tokens.
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams(seed=5, **options)
    sampler = make_sampler(params, torch.device("cpu"))
    shortlisted = [int(sampler(logits)) for _ in range(200)]
    generator = torch.Generator().manual_seed(5)
    rows = [torch.full((1,), v, dtype=d) for v, d in ((params.temperature, torch.float32),
                                                       (params.top_k, torch.long), (params.top_p, torch.float32))]
    whole = [int(sample_tokens(logits[None], *rows, generator)) for _ in range(200)]
    assert shortlisted == whole and len(set(whole)) > 1
