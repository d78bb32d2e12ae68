"""The paged engine on the tiny fp32 model: every greedy reply equals transformers' `generate` (peft's for an
adapter row), however the requests share the batch, the cache blocks and the steps."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch

from qwenbook_bridge.engine.errors import InvalidOptionError
from qwenbook_bridge.engine.generate.batching.requests import TokenDelta
from qwenbook_bridge.engine.generate.paged.scheduler import EngineConfig, PagedEngine
from qwenbook_bridge.engine.generate.sampling import SamplingParams


def tokens(n: int, seed: int) -> list[int]:
    """A prompt of n ordinary tokens (below the special ones)."""
    return torch.randint(0, 150_000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, greedy=True, **kw)


@pytest.fixture(scope="module")
def reference(tiny):
    """transformers' greedy `generate`, cut before the first end-of-sequence token (the engine does not
    return that token's id), memoized by (prompt, max_new_tokens)."""
    cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def get(prompt: list[int], n: int, model=None) -> list[int]:
        key = (tuple(prompt), n)
        if model is None and key in cache:
            return cache[key]
        with torch.inference_mode():
            out = (model or tiny.model).generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                 dtype=torch.long), max_new_tokens=n, do_sample=False)
        ids = out[0, len(prompt):].tolist()
        ids = next((ids[:i] for i, t in enumerate(ids) if t in tiny.eos_token_ids), ids)
        if model is None:
            cache[key] = ids
        return ids

    return get


@contextmanager
def engine(tiny, **config):
    e = PagedEngine(tiny.model, tiny.tokenizer, EngineConfig(**config), tiny.eos_token_ids)
    e.start()
    try:
        yield e
    finally:
        e.stop()


def run(e: PagedEngine, prompt: list[int], n: int, **kw) -> list[int]:
    return list(e.submit(prompt, greedy(n), **kw).result(timeout=120).token_ids)


def first_delta(handle) -> None:
    """Wait until the request has produced a token (it is running, past its prefill)."""
    for ev in handle.events(timeout=120):
        if isinstance(ev, TokenDelta) and ev.token_ids:
            return
    raise AssertionError("the request ended before its first token")


def test_mixed_length_requests_submitted_together_match_generate(tiny, reference):
    prompts = [tokens(n, seed) for seed, n in enumerate((3, 17, 40, 9, 25))]
    lengths = [6, 10, 4, 8, 12]
    with engine(tiny, num_blocks=64, block_size=4) as e:
        handles = [e.submit(p, greedy(n)) for p, n in zip(prompts, lengths)]
        for p, n, h in zip(prompts, lengths, handles):
            got = h.result(timeout=120)
            assert list(got.token_ids) == reference(p, n)
            assert got.prompt_tokens == len(p)
        stats = e.stats()
    assert stats.peak_batch_size == 5
    assert stats.blocks_used == 0 and stats.active == 0  # every finished row gave its blocks back


def test_requests_joining_and_leaving_a_running_batch_match_generate(tiny, reference):
    first, others = tokens(12, 10), [tokens(n, 11 + i) for i, n in enumerate((5, 30, 8))]
    with engine(tiny, num_blocks=64, block_size=4) as e:
        long_one = e.submit(first, greedy(24))
        ids: list[int] = []
        joined = []
        for ev in long_one.events(timeout=120):
            if isinstance(ev, TokenDelta):
                ids.extend(ev.token_ids)
                if ids and not joined:  # the first row is decoding: the others join (and leave) while it runs
                    joined = [e.submit(p, greedy(n)) for p, n in zip(others, (3, 5, 7))]
        assert ids == reference(first, 24)
        for p, n, h in zip(others, (3, 5, 7), joined):
            assert list(h.result(timeout=120).token_ids) == reference(p, n)
        assert e.stats().peak_batch_size > 1


def test_a_long_prompt_is_prefilled_in_chunks_while_other_rows_decode(tiny, reference):
    short, long_prompt = tokens(6, 20), tokens(70, 21)
    with engine(tiny, num_blocks=64, block_size=4, max_step_tokens=8) as e:
        steps: list[list[tuple[int, bool]]] = []
        step = e.runner.step

        def recording(chunks):
            steps.append([(len(c.token_ids), c.logits) for c in chunks])
            return step(chunks)

        e.runner.step = recording
        decoding = e.submit(short, greedy(20))
        ids: list[int] = []
        prefilled = None
        for ev in decoding.events(timeout=120):
            if isinstance(ev, TokenDelta):
                ids.extend(ev.token_ids)
                if prefilled is None:  # the short row is decoding: the long prompt arrives beside it
                    prefilled = e.submit(long_prompt, greedy(5))
        assert ids == reference(short, 20)
        assert list(prefilled.result(timeout=120).token_ids) == reference(long_prompt, 5)
    # Steps that decoded the short row and ran a partial prefill chunk of the long prompt beside it: the
    # prompt took several steps and the short row did not wait for them.
    mixed = [s for s in steps if (1, True) in s and any(n > 1 and not logits for n, logits in s)]
    assert len(mixed) >= 3
    assert all(sum(n for n, _ in s) <= 8 for s in steps)


def test_a_shared_system_prompt_is_found_in_the_prefix_cache(tiny, reference):
    system = tokens(40, 30)
    a, b = system + tokens(5, 31), system + tokens(7, 32)
    with engine(tiny, num_blocks=64, block_size=8) as e:
        assert run(e, a, 6) == reference(a, 6)
        assert e.stats().prefix_hit_tokens == 0
        assert run(e, b, 6) == reference(b, 6)
        stats = e.stats()
    assert stats.prefix_hit_tokens == 40  # the system prompt's 5 full blocks
    assert 0 < stats.prefix_hit_rate < 1


def test_prefixes_evicted_from_a_small_cache_are_computed_again(tiny, reference):
    prompts = [tokens(36, 40 + i) for i in range(3)]
    with engine(tiny, num_blocks=24, block_size=4) as e:  # 96 tokens: room for about two cached prompts
        for p in prompts + prompts[:1] + prompts:
            assert run(e, p, 6) == reference(p, 6)
        stats = e.stats()
        evictions = e.pool.stats().evictions
    assert evictions > 0
    assert stats.prefix_hit_tokens > 0  # the repeat right after its first run still hit


def test_a_request_larger_than_the_whole_cache_is_refused_and_the_others_finish(tiny, reference):
    prompts = [tokens(10, 50), tokens(14, 51)]
    with engine(tiny, num_blocks=10, block_size=4) as e:  # 40 tokens
        handles = [e.submit(p, greedy(8)) for p in prompts]
        with pytest.raises(InvalidOptionError, match=r"needs 13 cache blocks .* holds 10 blocks \(40 tokens\).*"
                                                     r"memory_utilization"):
            e.submit(tokens(30, 52), greedy(20))
        for p, h in zip(prompts, handles):
            assert list(h.result(timeout=120).token_ids) == reference(p, 8)


def test_rows_that_outgrow_a_tiny_cache_are_preempted_and_recomputed(tiny, reference):
    prompts = [tokens(8, 60 + i) for i in range(4)]
    with engine(tiny, num_blocks=14, block_size=4) as e:  # 4 rows of 8 + 14 tokens need 24 blocks
        handles = [e.submit(p, greedy(14)) for p in prompts]
        for p, h in zip(prompts, handles):
            got = h.result(timeout=120)
            assert list(got.token_ids) == reference(p, 14)
            assert got.completion_tokens == len(got.token_ids)
        stats = e.stats()
    assert stats.preemptions > 0
    assert stats.blocks_used == 0


def test_cancelling_one_row_frees_it_while_the_others_go_on(tiny, reference):
    keep, drop = tokens(9, 70), tokens(11, 71)
    with engine(tiny, num_blocks=64, block_size=4) as e:
        kept = e.submit(keep, greedy(20))
        dropped = e.submit(drop, greedy(200))
        first_delta(dropped)
        dropped.cancel()
        end = [ev for ev in dropped.events(timeout=120)][-1]
        assert end.finish_reason == "cancelled" and end.completion_tokens < 200
        got = kept.result(timeout=120)
        assert (list(got.token_ids), got.finish_reason) == (reference(keep, 20), "length")
        assert e.stats().blocks_used == 0


def test_exclusive_parks_the_engine_and_forgets_cached_prefixes(tiny, reference):
    system = tokens(24, 75)
    a, b = system + tokens(3, 76), system + tokens(4, 77)
    with engine(tiny, num_blocks=64, block_size=8) as e:
        assert run(e, a, 4) == reference(a, 4)
        with e.exclusive():
            waiting = e.submit(b, greedy(4))
            # Parked: the request queues and nothing runs it until the block ends.
            assert e.stats().waiting == 1 and not waiting.done.is_set()
            before = e.stats().steps
        # The block may have changed the weights, so the prefix `a` cached is not reused for `b`.
        assert list(waiting.result(timeout=120).token_ids) == reference(b, 4)
        assert e.stats().steps > before
        assert e.stats().prefix_hit_tokens == 0
        assert e.call_between_steps(lambda: threading.current_thread().name).result(timeout=60) == \
            "qwenbook-paged-engine"
        # Without a park in between, the same prompt finds its prefix again.
        assert run(e, b, 4) == reference(b, 4)
        assert e.stats().prefix_hit_tokens == 24


@pytest.fixture(scope="module")
def random_adapters(tiny_model_dir, tmp_path_factory):
    """Two adapters with non-zero weights on different modules, written with plain peft (as in test_adapters)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapters")
    paths = {}
    for name, seed, targets in (("alpha", 1, ["q_proj", "v_proj"]), ("beta", 2, ["up_proj", "down_proj", "o_proj"])):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                     init_lora_weights=False))
        peft_model.save_pretrained(out / name)
        paths[name] = out / name
    return paths


def test_rows_with_different_adapters_decode_in_one_batch(tiny, tiny_model_dir, reference, random_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompt = tokens(12, 80)
    expected = {None: reference(prompt, 10)}
    for name, path in random_adapters.items():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        expected[name] = reference(prompt, 10, PeftModel.from_pretrained(base, str(path)).eval())
    assert expected["alpha"] != expected[None] and expected["beta"] != expected[None]
    with engine(tiny, num_blocks=64, block_size=4, max_adapters=2) as e:
        for name, path in random_adapters.items():
            e.add_adapter(name, path)
        assert e.adapters() == ["alpha", "beta"]
        with pytest.raises(InvalidOptionError, match="no adapter named 'gamma'.*alpha, beta"):
            e.submit(prompt, greedy(10), adapter="gamma")
        # The same prompt under each adapter, twice: a prefix cached under one is never served to another.
        order = [None, "alpha", "beta", "alpha", None, "beta"]
        handles = [e.submit(prompt, greedy(10), adapter=name) for name in order]
        for name, h in zip(order, handles):
            assert list(h.result(timeout=120).token_ids) == expected[name], name
        assert e.stats().peak_batch_size > 1
        for name in order:
            assert run(e, prompt, 10, adapter=name) == expected[name], name
        e.remove_adapter("beta")
        assert e.adapters() == ["alpha"]


def test_an_engine_without_adapter_slots_says_how_to_get_some(tiny, random_adapters):
    with engine(tiny, num_blocks=8, block_size=4) as e:
        with pytest.raises(InvalidOptionError, match="max_adapters"):
            e.add_adapter("alpha", random_adapters["alpha"])


def test_stop_strings_and_stop_token_ids_end_the_reply(tiny, reference):
    prompt = tokens(10, 90)
    ids = reference(prompt, 24)
    assert len(ids) == 24
    text = tiny.tokenizer.decode(ids, skip_special_tokens=True)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip()
    with engine(tiny, num_blocks=64, block_size=4) as e:
        got = e.submit(prompt, greedy(24, stop=[stop])).result(timeout=120)
        assert got.finish_reason == "stop"
        assert got.text == text[:text.index(stop)]
        cut = e.submit(prompt, greedy(24, stop_token_ids=[ids[5]])).result(timeout=120)
    assert cut.finish_reason == "stop"
    assert list(cut.token_ids) == ids[:ids.index(ids[5])]


def test_the_openai_server_serves_with_the_paged_engine_and_falls_back_for_injected_lora(tiny, tiny_model_dir,
                                                                                        monkeypatch):
    # The PyTorch engines: on the CPU a base model is served by llama.cpp unless asked otherwise
    # (test_llama_cpp_engine.py).
    monkeypatch.setenv("QWENBOOK_CPU_ENGINE", "pytorch")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwenbook_bridge.engine.generate.batching.scheduler import BatchScheduler
    from qwenbook_bridge.openai.server import OpenAIServer, ServeConfig

    server = OpenAIServer.for_loaded(tiny, ServeConfig(port=0, memory_utilization=0.5))
    assert isinstance(server.scheduler, PagedEngine)
    assert server.scheduler.config.memory_utilization == 0.5
    # LoRA layers injected into the model (a worker's loaded adapter): the paged runner cannot read them, the
    # padded scheduler runs the model's own forward.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    assert isinstance(OpenAIServer(model, tiny.tokenizer, ServeConfig(port=0)).scheduler, BatchScheduler)
    with pytest.raises(InvalidOptionError, match="memoryUtilization"):
        ServeConfig(memory_utilization=1.5).validate()


def test_a_completion_larger_than_the_served_cache_is_a_400_that_says_so(tiny, reference):
    import httpx

    from qwenbook_bridge.openai.server import OpenAIServer, ServeConfig

    with engine(tiny, num_blocks=6, block_size=4) as e:  # 24 tokens
        with OpenAIServer(tiny.model, tiny.tokenizer, ServeConfig(port=0, model_name="tiny"), scheduler=e) as server:
            prompt = tokens(10, 100)
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 20, "temperature": 0}
            r = httpx.post(f"{server.url}/completions", json=body, timeout=120)
            assert r.status_code == 400, r.text
            assert "whole cache holds 6 blocks" in r.json()["error"]["message"]
            r = httpx.post(f"{server.url}/completions", json={**body, "max_tokens": 8}, timeout=120)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["text"] == tiny.tokenizer.decode(reference(prompt, 8), skip_special_tokens=True)


def test_end_tokens_ignore_eos_and_the_context_length_end_a_reply(tiny, reference):
    prompt = tokens(10, 110)
    ids = reference(prompt, 12)
    assert len(ids) == 12 and ids[4] not in ids[:4]
    # The reply's fifth token stands in for the model's end-of-sequence token.
    e = PagedEngine(tiny.model, tiny.tokenizer, EngineConfig(num_blocks=32, block_size=4, context_length=16),
                    frozenset({ids[4]}))
    e.start()
    try:
        ended = e.submit(prompt, greedy(12)).result(timeout=120)
        assert (list(ended.token_ids), ended.finish_reason, ended.completion_tokens) == (ids[:4], "stop", 5)
        # ignore_eos runs on; the context of 16 tokens leaves room for 6 after the 10-token prompt.
        on = e.submit(prompt, greedy(12, ignore_eos=True)).result(timeout=120)
        assert (list(on.token_ids), on.finish_reason) == (ids[:6], "length")
        with pytest.raises(InvalidOptionError, match="context holds 16"):
            e.submit(tokens(16, 111), greedy(1))
    finally:
        e.stop()


def test_each_row_samples_with_its_own_options_and_seed(tiny, reference):
    from qwenbook_bridge.engine.generate.generation import generate, prompt_ids

    chats = [[{"role": "user", "content": q}] for q in ("写一首关于秋天的诗", "Tell me about cats")]
    options = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7),
               # Below 1 the repetition penalty favours tokens already seen (this tiny model never repeats one
               # by itself, so a penalty above 1 would change nothing here).
               SamplingParams(max_tokens=16, greedy=True, repetition_penalty=0.2)]
    # The single-request decoder draws with the same per-request generator, so a seeded reply is the same there.
    solo = [generate(tiny, c, p).token_ids for c, p in zip(chats, options)]
    unpenalized = generate(tiny, chats[1], SamplingParams(max_tokens=16, greedy=True)).token_ids
    assert list(unpenalized) != list(solo[1])  # the penalties change this reply
    greedy_prompt = tokens(9, 120)
    with engine(tiny, num_blocks=64, block_size=4) as e:
        handles = [e.submit(prompt_ids(tiny, c), p) for c, p in zip(chats, options)]
        beside = e.submit(greedy_prompt, greedy(12))
        got = [list(h.result(timeout=120).token_ids) for h in handles]
        assert list(beside.result(timeout=120).token_ids) == reference(greedy_prompt, 12)
    assert got == [list(ids) for ids in solo]
