"""Running out of memory mid-generation: a readable error with a hint, memory given back, the next call works.

The allocator failure is simulated (a forward hook raises what torch raises) because the tiny model cannot
exhaust any real device; the handler, the engine's recovery and the reply are the real ones.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

from qwenbook_bridge.engine.errors import is_out_of_memory
from qwenbook_bridge.handlers.dispatch import Handlers
from qwenbook_bridge.handlers.context import JobContext
from qwenbook_bridge.protocol import exception_content, make_message, validate_message

CHAT = [{"role": "user", "content": "count to five"}]
ALLOCATOR_FAILURES = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 100000000000000 bytes. Error code 12 (Cannot allocate memory)"),
]


@pytest.fixture(scope="module")
def handlers_and_model(tiny_model_dir):
    handlers = Handlers("cpu")
    load = make_message("load", {"model": str(tiny_model_dir), "dtype": "fp32"}, "s")
    model_id = handlers.load(JobContext(load, threading.Event(), lambda *_: None))["model"]["model_id"]
    return handlers, model_id


def generate(handlers: Handlers, content: dict) -> dict:
    msg = make_message("generate", content, "s")
    try:
        reply = handlers.generate(JobContext(msg, threading.Event(), lambda *_: None))
    except Exception as e:  # what the server does with a failed job
        reply = exception_content(e)
    validate_message(make_message("generate_reply", reply, "s", parent=msg))
    return reply


@pytest.mark.parametrize("failure", ALLOCATOR_FAILURES, ids=["cuda", "cpu"])
def test_out_of_memory_while_generating_is_reported_and_recovered_from(handlers_and_model, failure, monkeypatch):
    # The failure is injected into transformers' forward and its KV cache is watched: the old decode loop's.
    # (tests/test_chat_engine.py fails a step of the chat engine, which notebook chat runs on by default.)
    monkeypatch.setenv("QWENBOOK_CHAT_ENGINE", "0")
    handlers, model_id = handlers_and_model
    chat = {"model_id": model_id, "messages": CHAT, "greedy": True, "max_tokens": 8}
    before = generate(handlers, chat)
    assert before["status"] == "ok"
    model = handlers.registry.get(model_id).model
    caches: list[weakref.ref] = []
    calls = {"n": 0}

    def remember_cache(_module, _args, kwargs):
        caches.append(weakref.ref(kwargs["past_key_values"]))

    def fail_on_third_step(_module, _args, _output):
        calls["n"] += 1
        if calls["n"] == 3:
            raise type(failure)(*failure.args)  # a fresh one, as the allocator makes: the parameter outlives the test

    hooks = [model.register_forward_pre_hook(remember_cache, with_kwargs=True),
             model.model.layers[0].register_forward_hook(fail_on_third_step)]
    try:
        reply = generate(handlers, chat)
    finally:
        for hook in hooks:
            hook.remove()
    assert reply["ename"] == "GenerationOutOfMemoryError"
    for hint in ("out of memory on cpu while generating", "after 2 new token(s)", "smaller max_tokens (now 8)",
                 "unload models", f"{model_id} is still loaded and usable"):
        assert hint in reply["evalue"]
    assert "allocator statistics" not in reply["evalue"] and "GPU 0 has a total capacity" not in reply["evalue"]
    # The KV cache of the failed request is gone, not held by a traceback.
    gc.collect()
    assert caches and all(ref() is None for ref in caches)
    after = generate(handlers, chat)
    assert after["status"] == "ok" and after["token_ids"] == before["token_ids"]


def test_other_errors_are_not_taken_for_out_of_memory():
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only allocator errors are RuntimeErrors
    assert is_out_of_memory(MemoryError())
