"""The OpenAI server serving LoRA adapters by model name (ServeConfig.adapters), on the tiny fp32 model: the
base and two adapters at once, each request's greedy tokens exactly peft's with that adapter alone."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from qwenbook_bridge.engine.errors import InvalidOptionError
from qwenbook_bridge.openai.server import OpenAIServer, ServeConfig

KEY = "sk-adapters"
BASE = "tiny-base"
HEADERS = {"Authorization": f"Bearer {KEY}"}
QUESTIONS = ["你好，你是谁？", "Write a haiku about the sea.", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two adapters with non-zero weights on different modules and ranks, written with plain peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("served-adapters")
    paths = {}
    for name, seed, rank, targets in (("alpha", 1, 4, ["q_proj", "v_proj"]),
                                      ("beta", 2, 12, ["up_proj", "down_proj", "o_proj"])):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                        init_lora_weights=False)).save_pretrained(out / name)
        paths[name] = out / name
    return paths


@pytest.fixture(scope="module")
def expected(tiny, tiny_model_dir, adapter_dirs):
    """Greedy replies of transformers' generate (peft's for an adapter, loaded alone), per (model, question)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models = {BASE: tiny.model}
    for name, path in adapter_dirs.items():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        models[name] = PeftModel.from_pretrained(base, str(path)).eval()
    out = {}
    for name, model in models.items():
        for q in QUESTIONS:
            text = tiny.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                      add_generation_prompt=True)
            prompt = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                ids = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
            ids = next((ids[:i] for i, t in enumerate(ids) if t in tiny.eos_token_ids), ids)
            out[name, q] = tiny.tokenizer.decode(ids)
    assert out["alpha", QUESTIONS[0]] != out[BASE, QUESTIONS[0]] != out["beta", QUESTIONS[0]]
    return out


@pytest.fixture(scope="module")
def server(tiny, adapter_dirs):
    config = ServeConfig(port=0, api_key=KEY, model_name=BASE, aliases=("tiny-alias",),
                         adapters={name: str(path) for name, path in adapter_dirs.items()}, max_batch_size=8)
    srv = OpenAIServer.for_loaded(tiny, config)
    srv.start()
    yield srv
    srv.stop()


def chat(server, model: str, q: str, stream: bool = False) -> tuple[int, dict]:
    body = {"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": 12, "temperature": 0,
            "stream": stream}
    if not stream:
        r = httpx.post(server.url + "/chat/completions", json=body, headers=HEADERS, timeout=120)
        return r.status_code, r.json()
    text, model_seen = [], None
    with httpx.stream("POST", server.url + "/chat/completions", json=body, headers=HEADERS, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                model_seen = chunk["model"]
                text += [c["delta"].get("content") or "" for c in chunk["choices"]]
    return r.status_code, {"model": model_seen, "choices": [{"message": {"content": "".join(text)}}]}


def test_the_engine_holds_each_adapter_in_a_slot_of_the_largest_rank(server):
    assert server.scheduler.adapters() == ["alpha", "beta"]
    assert server.scheduler.config.max_adapters == 2
    assert server.scheduler.config.max_lora_rank == 16  # rank 12 rounded up to a multiple of 8
    stats = server.stats()
    assert stats.adapters == ["alpha", "beta"]
    assert stats.blocks_total > 0 and stats.block_size > 0 and stats.cache_bytes > 0
    assert stats.memory_utilization == 0.9 and 0 <= stats.prefix_hit_rate <= 1


def test_concurrent_requests_for_base_and_adapters_each_get_their_own_model(server, expected):
    jobs = [(m, q, stream) for m in (BASE, "alpha", "beta") for q in QUESTIONS for stream in (False, True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda j: chat(server, *j), jobs))
    for (model, q, stream), (status, body) in zip(jobs, replies):
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == expected[model, q], (model, q, stream)
        assert body["model"] == model  # the reply names the model asked for
    assert server.stats().errors == 0


def test_completions_honour_the_adapter_and_an_alias_means_the_base(server, tiny, expected):
    q = QUESTIONS[1]
    text = tiny.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                              add_generation_prompt=True)
    for model, want in (("beta", "beta"), ("tiny-alias", BASE)):
        r = httpx.post(server.url + "/completions", headers=HEADERS, timeout=120,
                       json={"model": model, "prompt": text, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected[want, q] and r.json()["model"] == model


def test_models_lists_the_base_then_each_adapter_with_parent_and_root(server, adapter_dirs):
    data = httpx.get(server.url + "/models", headers=HEADERS, timeout=30).json()["data"]
    assert [m["id"] for m in data] == [BASE, "alpha", "beta"]
    assert "parent" not in data[0]
    for card in data[1:]:
        assert card["parent"] == BASE and card["root"] == str(adapter_dirs[card["id"]])
        assert card["object"] == "model"
    one = httpx.get(server.url + "/models/beta", headers=HEADERS, timeout=30).json()
    assert one["id"] == "beta" and one["parent"] == BASE


def test_an_unknown_model_is_a_404_listing_what_is_served(server):
    status, body = chat(server, "gamma", "hi")
    assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    assert "`gamma`" in body["error"]["message"]
    for served in (BASE, "alpha", "beta"):
        assert f"`{served}`" in body["error"]["message"]


@pytest.mark.parametrize("adapters, message", [
    ({"tiny-base": "ALPHA"}, "already the base model's name"),
    ({"tiny-alias": "ALPHA"}, "already an alias"),
    ({" x": "ALPHA"}, "non-empty string"),
    ({"x": "/nowhere/at/all"}, "adapter 'x'.*not found"),
    ({"x": "MODEL"}, "adapter 'x'.*full model folder"),
])
def test_bad_adapters_are_refused_before_anything_loads(adapters, message, adapter_dirs, tiny_model_dir):
    swap = {"ALPHA": str(adapter_dirs["alpha"]), "MODEL": str(tiny_model_dir)}
    adapters = {k: swap.get(v, v) for k, v in adapters.items()}
    with pytest.raises(InvalidOptionError, match=message):
        ServeConfig(model_name=BASE, aliases=("tiny-alias",), adapters=adapters).validate()


def test_a_server_without_adapters_has_no_slots(tiny):
    srv = OpenAIServer.for_loaded(tiny, ServeConfig(port=0, model_name=BASE))
    assert srv.scheduler.config.max_adapters == 0 and srv.stats().adapters == []


def test_adapters_need_the_paged_engine_and_say_so(tiny, tiny_model_dir, adapter_dirs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwenbook_bridge.engine.generate.batching.scheduler import BatchConfig, BatchScheduler

    config = ServeConfig(port=0, model_name=BASE, adapters={"alpha": str(adapter_dirs["alpha"])})
    # LoRA layers injected into the model: the paged runner cannot read it, and the padded scheduler has no slots.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(InvalidOptionError, match="served by name only by the paged engine, which cannot run this"):
        OpenAIServer(model, tiny.tokenizer, config)
    padded = BatchScheduler(tiny.model, tiny.tokenizer, BatchConfig(4), tiny.eos_token_ids)
    with pytest.raises(InvalidOptionError, match="only by the paged engine, not by BatchScheduler"):
        OpenAIServer(tiny.model, tiny.tokenizer, config, scheduler=padded)
    # Without adapters the padded scheduler serves, and its stats have no block cache to report.
    stats = OpenAIServer(tiny.model, tiny.tokenizer, ServeConfig(port=0), scheduler=padded).stats()
    assert stats.blocks_total is None and stats.cache_bytes is None and stats.adapters == []
    assert {k: v for k, v in stats.to_dict().items() if v is not None}.keys().isdisjoint({"blocks_total", "block_size"})
