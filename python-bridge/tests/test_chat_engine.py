"""Notebook chat on the chat engine (engine/generate/chat_engine.py), through the generate handler: the tiny fp32
model's greedy replies equal transformers' (peft's with an adapter) while the model's own forward never runs;
chats batch, a conversation's next turn reuses its cached prefix, adapters go into engine slots that are read
again when their folder changes, and what the engine cannot compute (DoRA) falls back to peft's layers."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from qwenbook_bridge.engine.errors import GenerationOutOfMemoryError
from qwenbook_bridge.engine.generate import chat_engine
from qwenbook_bridge.engine.generate.fast_ops import extract_weights, reading_base_weights
from qwenbook_bridge.engine.generate.generation import prompt_ids
from qwenbook_bridge.engine.model_parts import has_injected_adapters
from qwenbook_bridge.handlers.context import JobContext
from qwenbook_bridge.handlers.dispatch import Handlers
from qwenbook_bridge.protocol import make_message

CHAT = [{"role": "user", "content": "Tell me about the moon."}]


@pytest.fixture(autouse=True)
def pytorch_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the paged engine in PyTorch, which a CPU chat takes only when asked for (the default
    there is llama.cpp, tested in test_llama_cpp_engine.py)."""
    monkeypatch.setenv("QWENBOOK_CPU_ENGINE", "pytorch")


def fresh(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def bridge(tiny_model_dir):
    """A bridge's handlers with the tiny model loaded (its own copy: adapters go into its layers)."""
    handlers = Handlers("cpu")
    load = make_message("load", {"model": str(tiny_model_dir), "dtype": "fp32"}, "s")
    model_id = handlers.load(JobContext(load, threading.Event(), lambda *_: None))["model"]["model_id"]
    yield handlers, model_id
    handlers.close()


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory):
    """Adapters written by plain peft with non-zero weights: two LoRA of rank 4, one of rank 32, one DoRA."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("chat-adapters")
    specs = {"alpha": (1, dict(r=4, target_modules=["q_proj", "v_proj"])),
             "beta": (2, dict(r=4, target_modules=["up_proj", "down_proj", "o_proj"])),
             "wide": (3, dict(r=32, target_modules=["q_proj", "gate_proj"])),
             "dora": (4, dict(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))}
    for name, (seed, lora) in specs.items():
        torch.manual_seed(seed)
        get_peft_model(fresh(tiny_model_dir), LoraConfig(lora_alpha=8, init_lora_weights=False, **lora)) \
            .save_pretrained(out / name)
    return {name: out / name for name in specs}


def hf_greedy(tiny, model: Any, messages: list[dict[str, str]], n: int) -> list[int]:
    ids = torch.tensor([prompt_ids(tiny, messages)])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def peft_greedy(tiny, tiny_model_dir: Path, folder: Path, messages: list[dict[str, str]], n: int) -> list[int]:
    from peft import PeftModel

    return hf_greedy(tiny, PeftModel.from_pretrained(fresh(tiny_model_dir), str(folder)).eval(), messages, n)


def chat(bridge, messages=CHAT, cancel: threading.Event | None = None, events: list | None = None,
         **options: Any) -> dict[str, Any]:
    handlers, model_id = bridge
    content = {"model_id": model_id, "messages": messages, "greedy": True, "max_tokens": 16, **options}
    emit = (lambda kind, c: events.append(c)) if events is not None else (lambda *_: None)
    return handlers.generate(JobContext(make_message("generate", content, "s"), cancel or threading.Event(), emit))


def load_adapter(bridge, folder: Path, name: str) -> dict[str, Any]:
    handlers, model_id = bridge
    msg = make_message("adapter_load", {"model_id": model_id, "path": str(folder), "name": name}, "s")
    return handlers.adapter_jobs.adapter_load(JobContext(msg, threading.Event(), lambda *_: None))


class ForwardCalls:
    """Counts calls of the model's own forward (transformers' loop, peft's layers): the chat engine makes none."""

    def __init__(self, model: Any) -> None:
        self.n = 0
        self._hook = model.register_forward_pre_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.n += 1

    def __enter__(self) -> ForwardCalls:
        return self

    def __exit__(self, *_: object) -> None:
        self._hook.remove()


def engine_of(bridge):
    handlers, model_id = bridge
    engine = handlers.chat.engine(model_id)
    assert engine is not None and engine.running
    return engine


def model_of(bridge):
    handlers, model_id = bridge
    return handlers.registry.get(model_id).model


def test_greedy_chat_equals_transformers_on_the_chat_engine(bridge, tiny, tiny_model_dir):
    expected = hf_greedy(tiny, fresh(tiny_model_dir), CHAT, 24)
    events: list[dict[str, Any]] = []
    with ForwardCalls(model_of(bridge)) as calls:
        reply = chat(bridge, events=events, max_tokens=24)
    assert reply["token_ids"] == expected and reply["finish_reason"] == "length"
    assert calls.n == 0  # decoded by the engine, not the model's forward
    assert engine_of(bridge).stats().tokens_generated >= 24
    assert [t for e in events for t in e["token_ids"]] == expected
    assert "".join(e["text"] for e in events) == reply["text"]
    assert reply["ttft_ms"] > 0 and reply["tokens_per_s"] > 0 and reply["prompt_tokens"] == len(prompt_ids(tiny, CHAT))


def test_an_adapter_decodes_from_an_engine_slot_and_switched_off_gives_base_tokens(bridge, tiny, tiny_model_dir,
                                                                                    folders):
    base = chat(bridge, max_tokens=20)["token_ids"]
    expected = peft_greedy(tiny, tiny_model_dir, folders["alpha"], CHAT, 20)
    assert expected != base
    load_adapter(bridge, folders["alpha"], "alpha")
    model = model_of(bridge)
    assert has_injected_adapters(model)  # peft's layers are in the model, for the fallback path
    with ForwardCalls(model) as calls:
        assert chat(bridge, adapter="alpha", max_tokens=20)["token_ids"] == expected
        # Adapter off: the base model's tokens, still from the engine, not through peft's (slower) layers.
        assert chat(bridge, max_tokens=20)["token_ids"] == base
        assert chat(bridge, adapter="alpha", max_tokens=20)["token_ids"] == expected
    assert calls.n == 0
    assert [n.split("#")[0] for n in engine_of(bridge).adapters()] == ["alpha"]


def test_chats_from_two_notebooks_decode_in_one_batch(bridge):
    alone = chat(bridge, max_tokens=24)["token_ids"]
    engine = engine_of(bridge)
    replies: list[dict[str, Any]] = []
    with engine.exclusive():  # parked: both requests queue, then start in the same step
        threads = [threading.Thread(target=lambda: replies.append(chat(bridge, max_tokens=24))) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while engine.stats().waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(120)
    assert [r["token_ids"] for r in replies] == [alone, alone]
    assert engine.stats().peak_batch_size >= 2


def test_the_next_turn_of_a_conversation_reuses_its_cached_prefix(bridge, tiny, tiny_model_dir):
    first = [{"role": "user", "content": "Write two lines about a quiet harbour at dawn."}]
    reply = chat(bridge, first, max_tokens=12)
    second = first + [{"role": "assistant", "content": reply["text"]}, {"role": "user", "content": "And at dusk?"}]
    engine = engine_of(bridge)
    before = engine.stats().prefix_hit_tokens
    again = chat(bridge, second, max_tokens=12)
    hits = engine.stats().prefix_hit_tokens - before
    assert hits >= len(prompt_ids(tiny, first)) // 16 * 16 > 0
    assert again["token_ids"] == hf_greedy(tiny, fresh(tiny_model_dir), second, 12)


def test_cancel_mid_stream_ends_the_reply_and_frees_the_row(bridge):
    cancel = threading.Event()
    events: list[dict[str, Any]] = []

    def emit(kind: str, content: dict[str, Any]) -> None:
        events.append(content)
        if len(events) == 3:
            cancel.set()

    handlers, model_id = bridge
    msg = make_message("generate", {"model_id": model_id, "messages": CHAT, "greedy": True, "max_tokens": 400}, "s")
    reply = handlers.generate(JobContext(msg, cancel, emit))
    assert reply["finish_reason"] == "cancelled"
    assert reply["completion_tokens"] == sum(len(e["token_ids"]) for e in events) < 400
    engine = engine_of(bridge)
    deadline = time.monotonic() + 30
    while engine.stats().active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().active == 0 and engine.stats().blocks_used == 0


def test_stop_strings_and_seeds_keep_their_meaning(bridge):
    reference = chat(bridge, max_tokens=24)
    stop = reference["text"][10:13]
    cut = chat(bridge, max_tokens=24, stop=[stop])
    assert cut["finish_reason"] == "stop_string" and cut["text"] == reference["text"][:reference["text"].find(stop)]
    sampled = dict(greedy=False, temperature=1.3, top_k=0, top_p=1.0, seed=5, max_tokens=16)
    os.environ["QWENBOOK_CHAT_ENGINE"] = "0"
    try:
        old_loop = chat(bridge, **sampled)["token_ids"]
    finally:
        del os.environ["QWENBOOK_CHAT_ENGINE"]
    assert chat(bridge, **sampled)["token_ids"] == old_loop


def test_a_folder_written_again_is_read_again(bridge, tiny, tiny_model_dir, folders, tmp_path):
    handlers, model_id = bridge
    folder = tmp_path / "run-output"
    shutil.copytree(folders["alpha"], folder)
    load_adapter(bridge, folder, "trained")
    assert chat(bridge, adapter="trained")["token_ids"] == peft_greedy(tiny, tiny_model_dir, folders["alpha"], CHAT, 16)

    def rewrite(source: Path) -> None:  # what a training run into the same output folder leaves behind
        for f in source.iterdir():
            shutil.copy(f, folder / f.name)
        st = (folder / "adapter_model.safetensors").stat()
        os.utime(folder / "adapter_model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    # A training run (it parks the engines) rewrites the folder: the slot is read again on its next use.
    with handlers.exclusive(model_id):
        rewrite(folders["beta"])
    assert chat(bridge, adapter="trained")["token_ids"] == peft_greedy(tiny, tiny_model_dir, folders["beta"], CHAT, 16)
    # The notebook loads the new weights (adapter_load sees the new stamp): the engine follows, and so does peft.
    rewrite(folders["alpha"])
    assert load_adapter(bridge, folder, "trained")["reloaded"]
    with ForwardCalls(model_of(bridge)) as calls:
        assert chat(bridge, adapter="trained")["token_ids"] == \
            peft_greedy(tiny, tiny_model_dir, folders["alpha"], CHAT, 16)
    assert calls.n == 0


def test_a_training_run_gets_the_chat_engines_cache_back_and_the_next_chat_makes_it_again(bridge):
    handlers, model_id = bridge
    before = chat(bridge, max_tokens=8)["token_ids"]
    engine = engine_of(bridge)
    with handlers.train.exclusive(model_id):  # what a run on this model holds while it trains
        assert not engine.running and handlers.chat.engine(model_id) is None
    assert chat(bridge, max_tokens=8)["token_ids"] == before
    assert engine_of(bridge) is not engine


def test_slots_are_evicted_least_recently_used_and_a_larger_rank_rebuilds_the_idle_engine(bridge, tiny,
                                                                                           tiny_model_dir, folders,
                                                                                           tmp_path):
    handlers, model_id = bridge
    names = []
    for i in range(handlers.chat.config.max_adapters + 1):
        folder = tmp_path / f"copy{i}"
        shutil.copytree(folders["beta"], folder)
        load_adapter(bridge, folder, f"copy{i}")
        names.append(f"copy{i}")
    expected = peft_greedy(tiny, tiny_model_dir, folders["beta"], CHAT, 8)
    for name in names:
        assert chat(bridge, adapter=name, max_tokens=8)["token_ids"] == expected
    loaded = [n.split("#")[0] for n in engine_of(bridge).adapters()]
    assert len(loaded) == handlers.chat.config.max_adapters and "copy0" not in loaded and names[-1] in loaded
    engine = engine_of(bridge)
    assert engine.config.max_lora_rank == 16
    load_adapter(bridge, folders["wide"], "wide")
    assert chat(bridge, adapter="wide", max_tokens=8)["token_ids"] == \
        peft_greedy(tiny, tiny_model_dir, folders["wide"], CHAT, 8)
    rebuilt = engine_of(bridge)
    assert rebuilt is not engine and not engine.running and rebuilt.config.max_lora_rank == 32


def test_a_dora_adapter_falls_back_to_peft_with_its_own_tokens(bridge, tiny, tiny_model_dir, folders, caplog):
    load_adapter(bridge, folders["dora"], "dora")
    expected = peft_greedy(tiny, tiny_model_dir, folders["dora"], CHAT, 12)
    with caplog.at_level(logging.INFO), ForwardCalls(model_of(bridge)) as calls:
        assert chat(bridge, adapter="dora", max_tokens=12)["token_ids"] == expected
        assert chat(bridge, adapter="dora", max_tokens=12)["token_ids"] == expected
    assert calls.n > 0  # peft's layers computed it
    said = [r.getMessage() for r in caplog.records if "takes the peft path" in r.getMessage()]
    assert len(said) == 1 and "DoRA" in said[0]  # once: the engine is not asked again for that folder
    assert not any(n.startswith("dora#") for n in engine_of(bridge).adapters())


def test_out_of_memory_on_the_engine_is_the_generation_error_and_the_engine_goes_on(bridge, monkeypatch):
    engine = engine_of(bridge)
    before = chat(bridge, max_tokens=8)["token_ids"]
    real_step, calls = engine.runner.step, {"n": 0}

    def failing_step(chunks):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                         "capacity of 79 GiB")
        return real_step(chunks)

    monkeypatch.setattr(engine.runner, "step", failing_step)
    with pytest.raises(GenerationOutOfMemoryError, match=r"out of memory on cpu while generating .*after 2 new"):
        chat(bridge, max_tokens=8)
    monkeypatch.undo()
    assert chat(bridge, max_tokens=8)["token_ids"] == before


def test_a_model_the_engine_cannot_run_chats_on_the_old_loop(tiny_model_dir, monkeypatch, caplog):
    def cannot(*_: Any, **__: Any) -> None:
        raise TypeError("the fast decoder supports model types ('qwen2', 'qwen3'), not 'llama'")

    monkeypatch.setattr(chat_engine, "PagedEngine", cannot)
    handlers = Handlers("cpu")
    load = make_message("load", {"model": str(tiny_model_dir), "dtype": "fp32"}, "s")
    model_id = handlers.load(JobContext(load, threading.Event(), lambda *_: None))["model"]["model_id"]
    try:
        with caplog.at_level(logging.INFO):
            first = chat((handlers, model_id), max_tokens=8)
            second = chat((handlers, model_id), max_tokens=8)
        assert first["token_ids"] == second["token_ids"] and first["finish_reason"] == "length"
        assert handlers.chat.engine(model_id) is None
        assert sum("cannot run it" in r.getMessage() for r in caplog.records) == 1
    finally:
        handlers.close()


def test_no_room_for_the_cache_now_takes_the_old_loop_and_a_later_chat_tries_again(tiny_model_dir, monkeypatch):
    from qwenbook_bridge.engine.errors import InvalidOptionError

    real = chat_engine.cache_budget_bytes
    tries = {"n": 0}

    def full_then_free(*args: Any, **kwargs: Any) -> int:
        tries["n"] += 1
        if tries["n"] == 1:
            raise InvalidOptionError("the cache gets 0 bytes: cuda:0 has 79.1 GiB with 78.0 GiB in use")
        return real(*args, **kwargs)

    monkeypatch.setattr(chat_engine, "cache_budget_bytes", full_then_free)
    handlers = Handlers("cpu")
    load = make_message("load", {"model": str(tiny_model_dir), "dtype": "fp32"}, "s")
    model_id = handlers.load(JobContext(load, threading.Event(), lambda *_: None))["model"]["model_id"]
    try:
        first = chat((handlers, model_id), max_tokens=8)
        assert handlers.chat.engine(model_id) is None
        assert chat((handlers, model_id), max_tokens=8)["token_ids"] == first["token_ids"]
        assert handlers.chat.engine(model_id) is not None and tries["n"] == 2
    finally:
        handlers.close()


def test_extract_weights_reads_the_base_under_adapter_layers_that_add_nothing(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = fresh(tiny_model_dir)
    q = model.model.layers[0].self_attn.q_proj.weight
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    with pytest.raises(TypeError, match="adapter switched on"):
        extract_weights(model)  # an active adapter: reading the base would ignore it
    with reading_base_weights():  # the chat engine applies adapters itself
        assert extract_weights(model).layers[0].q_weight is q
    peft_model.base_model.disable_adapter_layers()  # loaded but off, as the bridge keeps its adapters
    assert extract_weights(model).layers[0].q_weight is q


def test_unloading_the_model_stops_its_chat_engine(tiny_model_dir):
    handlers = Handlers("cpu")
    load = make_message("load", {"model": str(tiny_model_dir), "dtype": "fp32"}, "s")
    model_id = handlers.load(JobContext(load, threading.Event(), lambda *_: None))["model"]["model_id"]
    chat((handlers, model_id), max_tokens=4)
    engine = handlers.chat.engine(model_id)
    assert engine is not None and engine.running
    unload = make_message("unload", {"model_id": model_id}, "s")
    assert handlers.unload(JobContext(unload, threading.Event(), lambda *_: None))["unloaded"]
    assert not engine.running and handlers.chat.engine(model_id) is None
    handlers.close()


def test_the_worker_runs_chats_at_once_and_other_work_beside_them(client, model_id):
    """In the worker process: a short chat sent after a long one answers first (the worker no longer runs one
    chat at a time), and a control request and a job for the model are answered meanwhile."""
    long = client.send("generate", {"model_id": model_id, "messages": CHAT, "max_tokens": 3000, "greedy": True})
    while client.recv().msg_type != "token":
        pass
    short = client.send("generate", {"model_id": model_id, "messages": CHAT, "max_tokens": 6, "greedy": True})
    listed = client.send("adapter_list", {"model_id": model_id})
    replies: dict[str, Any] = {}
    while short.msg_id not in replies or listed.msg_id not in replies:
        msg = client.recv()
        if msg.msg_type != "token":
            replies[msg.parent_header["msg_id"]] = msg.content
    assert long.msg_id not in replies  # still decoding
    assert replies[short.msg_id]["completion_tokens"] == 6 and replies[listed.msg_id]["adapters"] == []
    client.send("cancel", {"target": long.msg_id})
    while long.msg_id not in replies:
        msg = client.recv()
        if msg.msg_type == "generate_reply":
            replies[msg.parent_header["msg_id"]] = msg.content
    assert replies[long.msg_id]["finish_reason"] == "cancelled"


def test_job_lanes_run_concurrent_jobs_on_threads_that_leave_their_model_free():
    from types import SimpleNamespace

    from qwenbook_bridge.worker.job_lanes import JobLanes, ModelFree

    class Push:
        def send_multipart(self, frames: Any) -> None:
            pass

        def close(self) -> None:
            pass

    gate, ran, freed = threading.Event(), [], []

    def run_job(job: Any, _push: Any) -> None:
        if job.request.msg_type in ("train", "generate") and job.name.endswith("slow"):
            assert gate.wait(10)
        ran.append(job.name)

    def job(name: str, kind: str, model: str) -> Any:
        return SimpleNamespace(name=name, request=SimpleNamespace(msg_type=kind, content={"model_id": model}))

    lanes = JobLanes(run_job, Push, frozenset({"train"}), freed.append, frozenset({"generate"}))
    lanes.dispatch(job("chat-a-slow", "generate", "a"), Push())
    lanes.dispatch(job("chat-a", "generate", "a"), Push())  # beside the slow one, not behind it
    lanes.dispatch(job("export-a", "export", "a"), Push())  # the model is not taken by a chat
    deadline = time.monotonic() + 10
    while len(ran) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(ran) == ["chat-a", "export-a"]
    lanes.dispatch(job("train-b-slow", "train", "b"), Push())
    lanes.dispatch(job("chat-b", "generate", "b"), Push())  # waits for the long job on its model
    time.sleep(0.2)
    assert "chat-b" not in ran
    gate.set()
    deadline = time.monotonic() + 10
    while not freed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert freed == [ModelFree("b")]  # only the long job gives its model back
    lanes.release(freed[0], Push())
    lanes.finish(Push(), 10)
    assert sorted(ran) == ["chat-a", "chat-a-slow", "chat-b", "export-a", "train-b-slow"]
