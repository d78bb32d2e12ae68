"""The paged engines' key/value caches in status and in the `gpu` broadcast: the notebook chat engine of a model
once it has chatted, and an HTTP server's engine while it serves, each with its model, device and fill."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from qwenbook_bridge.engine.llama_cpp.engine import LlamaCppEngine
from qwenbook_bridge.handlers.context import JobContext
from qwenbook_bridge.handlers.dispatch import Handlers
from qwenbook_bridge.protocol import make_message, validate_message

CHAT = [{"role": "user", "content": "Tell me about the moon."}]


@pytest.fixture(scope="module")
def bridge(tiny_model_dir):
    handlers = Handlers("cpu")
    load = make_message("load", {"model": str(tiny_model_dir), "dtype": "fp32"}, "s")
    model_id = handlers.load(JobContext(load, threading.Event(), lambda *_: None))["model"]["model_id"]
    yield handlers, model_id
    handlers.close()


def status(handlers: Handlers) -> dict[str, Any]:
    reply = handlers.status([])
    validate_message(make_message("status_reply", reply, "s"))  # what the kernel is sent must match the schema
    return reply


def test_a_chat_engine_appears_in_status_with_its_blocks_in_use_while_it_decodes(bridge):
    handlers, model_id = bridge
    # No chat yet: on the CPU the llama.cpp engine is made at load (its cache empty); elsewhere there is none yet.
    assert all(c["blocks_used"] == 0 and c["running"] == 0 for c in status(handlers)["engines"])

    # Status is read at the first token, then the chat is cancelled: the row holds its blocks until then
    # (a greedy chat with the tiny model runs to max_tokens, thousands of steps away).
    cancel, during = threading.Event(), []

    def emit(kind: str, _content: dict[str, Any]) -> None:
        if kind == "token" and not during:
            during.append(status(handlers))
            cancel.set()

    content = {"model_id": model_id, "messages": CHAT, "greedy": True, "max_tokens": 2000}
    reply = handlers.generate(JobContext(make_message("generate", content, "s"), cancel, emit))
    assert reply["finish_reason"] == "cancelled"

    [cache] = during[0]["engines"]
    assert cache["model_id"] == model_id and cache["role"] == "chat" and cache["device"] == "cpu"
    assert cache["running"] == 1 and cache["waiting"] == 0
    assert 0 < cache["blocks_used"] < cache["blocks_total"]
    engine = handlers.chat.engine(model_id)
    assert engine is not None
    if isinstance(engine, LlamaCppEngine):  # the CPU default: a cell per token, f32 keys and values (fp32 model)
        assert cache["block_size"] == 1
        assert cache["blocks_total"] == engine.config.max_batch_size * engine.tokens_per_row
        cfg = engine._text_config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4
        assert cache["cache_bytes"] == per_token * cache["blocks_total"]
    else:
        assert cache["block_size"] == engine.pool.block_size
        assert cache["cache_bytes"] == engine.runner.shape.bytes_per_block() * cache["blocks_total"] > 0
    # The chat engine's cache is a fixed number of rows, not a share of the device.
    assert "memory_utilization" not in cache

    # Once the engine has dropped the cancelled row (at its next step), its blocks are free again.
    deadline = time.monotonic() + 10
    while (after := status(handlers)["engines"][0])["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert after["blocks_used"] == 0 and after["running"] == 0
    assert after["blocks_total"] == cache["blocks_total"]


def test_a_server_appears_beside_the_chat_engine_and_goes_when_it_stops(bridge):
    handlers, model_id = bridge
    content = {"model_id": model_id, "port": 0, "max_batch_size": 2, "memory_utilization": 0.5}
    started = handlers.serve.start(JobContext(make_message("serve_start", content, "s"), threading.Event(),
                                              lambda *_: None))
    try:
        engines = status(handlers)["engines"]
        roles = [(e["role"], e["model_id"]) for e in engines]
        assert ("server", model_id) in roles
        server = next(e for e in engines if e["role"] == "server")
        if isinstance(handlers.serve.paged_engines()[0][1], LlamaCppEngine):
            # On the CPU the server runs llama.cpp, whose cache is a fixed number of rows, not a share of RAM.
            assert "memory_utilization" not in server and server["block_size"] == 1
        else:
            # Sized from the share it was given, as the server's own stats say.
            assert server["memory_utilization"] == 0.5
        stats = started["server"]["stats"]
        assert (server["blocks_total"], server["cache_bytes"]) == (stats["blocks_total"], stats["cache_bytes"])
        assert server["device"] == "cpu" and server["blocks_used"] == 0
    finally:
        handlers.serve.stop({"model_id": model_id})
    assert all(e["role"] != "server" for e in status(handlers)["engines"])


def test_the_gpu_broadcast_carries_the_same_engines(bridge):
    from qwenbook_bridge.worker.server import WorkerServer

    handlers, model_id = bridge
    handlers.chat.lease(handlers.registry.get(model_id)).release()  # the chat engine, made if not yet there
    srv = WorkerServer("0" * 64, handlers=handlers)
    sent: list[tuple[str, dict[str, Any]]] = []
    srv._broadcast = lambda msg_type, content: sent.append((msg_type, content))  # type: ignore[method-assign]
    try:
        srv._gpu_event()
    finally:
        for sock in (srv.router, srv.pub, srv._pull):
            sock.close(0)
        srv._ctx.term()
        srv._wake_r.close()
        srv._wake_w.close()
    [(msg_type, content)] = sent
    validate_message(make_message(msg_type, content, "s"))
    assert msg_type == "gpu" and content["devices"][0]["device"] == "cpu"
    assert [(e["role"], e["model_id"]) for e in content["engines"]] == [("chat", model_id)]
    assert content["engines"] == handlers.status([])["engines"]
