"""The CPU chat engine on llama.cpp (engine/llama_cpp): through the chat engines the worker uses, the tiny fp32
model's greedy replies equal the PyTorch engine's token for token (an f32 GGUF: both compute the same function,
only the summation order differs); requests batch in one llama.cpp context and each equals its reply alone; a
conversation's next turn computes only its new tokens; cancel ends a reply; the GGUF copy is written once per
weights and written again when they change; adapters and unknown setups take the PyTorch engine."""

from __future__ import annotations

import logging

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from qwenbook_bridge.engine import LoadOptions, SamplingParams, load_model
from qwenbook_bridge.engine.errors import InvalidOptionError
from qwenbook_bridge.engine.generate.batching.requests import Finished, TokenDelta
from qwenbook_bridge.engine.generate.chat_engine import ChatEngines
from qwenbook_bridge.engine.generate.generation import generate, prompt_ids
from qwenbook_bridge.engine.generate.paged.scheduler import PagedEngine
from qwenbook_bridge.engine.llama_cpp import library as llama_library
from qwenbook_bridge.engine.llama_cpp.engine import LlamaCppEngine, cpu_engine_choice
from qwenbook_bridge.engine.llama_cpp.gguf_cache import gguf_type_for
from qwenbook_bridge.engine.models.adapter_registry import AdapterRegistry

CHAT = [{"role": "user", "content": "Tell me about the moon."}]
GREEDY = SamplingParams(max_tokens=24, greedy=True, ignore_eos=True)


@pytest.fixture(autouse=True)
def gguf_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path_factory.getbasetemp() / "gguf-cache"
    monkeypatch.setenv("QWENBOOK_GGUF_CACHE", str(folder))
    monkeypatch.setenv("QWENBOOK_CPU_ENGINE", "llama.cpp")
    return folder


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> Any:
    return load_model(str(tiny_model_dir), LoadOptions(dtype="fp32", device="cpu"))


@pytest.fixture
def engines() -> Any:
    e = ChatEngines(AdapterRegistry())
    yield e
    e.close()


def reply(loaded: Any, engines: ChatEngines, messages: list[dict[str, Any]] = CHAT,
          params: SamplingParams = GREEDY) -> tuple[Any, Any]:
    lease = engines.lease(loaded)
    assert lease is not None
    with lease:
        return generate(loaded, messages, params, engine=lease.engine), lease.engine


def pytorch_reply(loaded: Any, messages: list[dict[str, Any]] = CHAT, params: SamplingParams = GREEDY,
                  monkeypatch: pytest.MonkeyPatch | None = None) -> Any:
    engines = ChatEngines(AdapterRegistry())
    assert monkeypatch is not None
    with monkeypatch.context() as m:
        m.setenv("QWENBOOK_CPU_ENGINE", "pytorch")
        try:
            lease = engines.lease(loaded)
            if lease is None:  # a model the paged engine does not run (Qwen3-MoE): transformers' forward
                return generate(loaded, messages, params)
            assert isinstance(lease.engine, PagedEngine)
            with lease:
                return generate(loaded, messages, params, engine=lease.engine)
        finally:
            engines.close()


def test_greedy_reply_equals_the_pytorch_engine(loaded: Any, engines: ChatEngines, gguf_cache: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    got, engine = reply(loaded, engines)
    assert isinstance(engine, LlamaCppEngine) and engine.gguf.parent == gguf_cache
    assert engine.gguf.name.endswith("-f32.gguf")
    want = pytorch_reply(loaded, monkeypatch=monkeypatch)
    assert got.token_ids == want.token_ids and len(got.token_ids) == 24
    assert got.text == want.text and got.finish_reason == "length"
    # Stop strings and end tokens are ours, as on every path: a stop string cut from the reply ends it there.
    stop = want.text[len(want.text) // 2:][:3]
    if stop.strip():
        cut, _ = reply(loaded, engines, params=SamplingParams(max_tokens=24, greedy=True, ignore_eos=True,
                                                              stop=(stop,)))
        assert cut.finish_reason == "stop_string" and cut.text == want.text[:want.text.index(stop)]


@pytest.mark.parametrize("arch", ["qwen3", "qwen3-moe"])
def test_qwen3_and_its_moe_reply_as_on_pytorch(arch: str, request: pytest.FixtureRequest, engines: ChatEngines,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    folder = request.getfixturevalue("tiny_qwen3_dir" if arch == "qwen3" else "tiny_qwen3_moe_dir")
    model = load_model(str(folder), LoadOptions(dtype="fp32", device="cpu"))
    messages = [{"role": "user", "content": "Tell me about the moon."}]
    got, engine = reply(model, engines, messages)
    assert isinstance(engine, LlamaCppEngine)
    assert got.token_ids == pytorch_reply(model, messages, monkeypatch=monkeypatch).token_ids


def test_requests_decode_together_and_each_equals_its_reply_alone(loaded: Any, engines: ChatEngines) -> None:
    other = [{"role": "user", "content": "Name three rivers."}]
    alone = [reply(loaded, engines, m)[0].token_ids for m in (CHAT, other)]
    lease = engines.lease(loaded)
    assert lease is not None
    engine = lease.engine
    with lease:
        handles = [engine.submit(prompt_ids(loaded, m), GREEDY) for m in (CHAT, other)]
        together = []
        for h in handles:
            tokens: list[int] = []
            for ev in h.events(timeout=120):
                if isinstance(ev, TokenDelta):
                    tokens.extend(ev.token_ids)
            together.append(tuple(tokens))
    assert together == [tuple(t) for t in alone]
    assert engine.stats().peak_batch_size == 2


def test_a_conversations_next_turn_computes_only_its_new_tokens(loaded: Any, engines: ChatEngines) -> None:
    first, engine = reply(loaded, engines)
    before = engine.stats().prefix_hit_tokens
    turn = [*CHAT, {"role": "assistant", "content": first.text}, {"role": "user", "content": "And the sun?"}]
    second, _ = reply(loaded, engines, turn)
    reused = engine.stats().prefix_hit_tokens - before
    # The template's first turn (system, question, the opening of the answer) is found cached.
    assert reused >= len(prompt_ids(loaded, CHAT))
    assert reused < second.prompt_tokens


def test_cancel_ends_a_reply_with_what_it_has(loaded: Any, engines: ChatEngines) -> None:
    lease = engines.lease(loaded)
    assert lease is not None
    with lease:
        h = lease.engine.submit(prompt_ids(loaded, CHAT), SamplingParams(max_tokens=5000, greedy=True,
                                                                         ignore_eos=True))
        got = 0
        for ev in h.events(timeout=120):
            if isinstance(ev, TokenDelta):
                got += len(ev.token_ids)
                if got >= 3:
                    h.cancel()
            else:
                assert isinstance(ev, Finished)
                assert ev.finish_reason == "cancelled" and 3 <= ev.completion_tokens < 5000


def test_the_gguf_copy_is_written_once_per_weights(tiny_model_dir: Path, gguf_cache: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    own = load_model(str(tiny_model_dir), LoadOptions(dtype="fp32", device="cpu"))
    engines = ChatEngines(AdapterRegistry())
    try:
        first, engine = reply(own, engines)
        path, stamp = engine.gguf, engine.gguf.stat().st_mtime_ns
        engines.forget(own.model_id)
        again, engine = reply(own, engines)
        assert engine.gguf == path and again.token_ids == first.token_ids
        # A block that changes the weights (as full fine-tuning does) leaves the engine for a new one, whose
        # copy has the new weights: its reply is PyTorch's with them.
        with engines.exclusive(own.model_id), torch.no_grad():
            own.model.model.norm.weight.mul_(-3.0)
        changed, engine = reply(own, engines)
        assert engine.gguf != path and path.exists()
        assert changed.token_ids == pytorch_reply(own, monkeypatch=monkeypatch).token_ids
        assert changed.token_ids != first.token_ids
        assert path.stat().st_mtime_ns >= stamp
    finally:
        engines.close()


def test_by_default_chat_runs_a_q8_0_copy_close_to_the_fp32_model(loaded: Any, engines: ChatEngines,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QWENBOOK_CPU_GGUF_TYPE")
    _, engine = reply(loaded, engines)
    assert isinstance(engine, LlamaCppEngine) and engine.gguf.name.endswith("-q8_0.gguf")
    cfg = loaded.model.config
    f16_cache = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    assert engine.stats().cache_bytes == engine.config.max_batch_size * engine.tokens_per_row * f16_cache
    ids = prompt_ids(loaded, CHAT)
    got = engine.prompt_logits(ids)
    with torch.inference_mode():
        want = loaded.model(torch.tensor([ids])).logits[0, -1]
    # q8_0 rounds each weight (and llama.cpp each activation) to 8 bits per 32 values: the logits follow fp32's
    # closely (the random tiny model's top logits are near-ties, so which of them is largest may change).
    corr = float(torch.corrcoef(torch.stack([got, want]))[0, 1])
    rel = float((got - want).square().mean().sqrt() / want.std())
    assert corr > 0.99 and rel < 0.1, (corr, rel)


def test_gguf_type_follows_the_loaded_weights(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qwenbook_bridge.engine.quant.config import QuantConfig
    from qwenbook_bridge.engine.quant.quantize import quantize_model

    monkeypatch.delenv("QWENBOOK_CPU_GGUF_TYPE")
    got = {"fp32": gguf_type_for(load_model(str(tiny_model_dir), LoadOptions(dtype="fp32", device="cpu")).model)}
    for method in ("int8", "int4"):
        m = load_model(str(tiny_model_dir), LoadOptions(dtype="fp32", device="cpu"))
        quantize_model(m.model, QuantConfig(method=method, group_size=32), tokenizer=m.tokenizer)
        got[method] = gguf_type_for(m.model)
    assert got == {"fp32": "q8_0", "int8": "q8_0", "int4": "q4_0"}
    monkeypatch.setenv("QWENBOOK_CPU_GGUF_TYPE", "q5_k")
    with pytest.raises(ValueError, match="QWENBOOK_CPU_GGUF_TYPE='q5_k' is not a GGUF type"):
        gguf_type_for(m.model)


def test_an_adapter_chat_takes_the_pytorch_engine(tiny_model_dir: Path, engines: ChatEngines,
                                                  tmp_path: Path) -> None:
    loaded = load_model(str(tiny_model_dir), LoadOptions(dtype="fp32", device="cpu"))  # its own: adapters go in
    _, engine = reply(loaded, engines)
    assert isinstance(engine, LlamaCppEngine)
    registry = engines.adapters
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)) \
        .save_pretrained(tmp_path / "a")
    from qwenbook_bridge.engine.llama_cpp.gguf_cache import weights_key

    before = weights_key(loaded.model, "q8_0")
    registry.manager(loaded).load(str(tmp_path / "a"), "a")
    assert weights_key(loaded.model, "q8_0") == before  # adapter layers around the same base: the same copy
    lease = engines.lease(loaded, "a")
    assert lease is not None and isinstance(lease.engine, PagedEngine) and lease.adapter is not None
    lease.release()


def test_without_the_library_chat_runs_on_pytorch_and_says_why(loaded: Any, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture,
                                                               tmp_path: Path) -> None:
    monkeypatch.setattr(llama_library, "_loaded", None)
    monkeypatch.setenv("QWENBOOK_LLAMA_CPP_LIB", str(tmp_path))
    engines = ChatEngines(AdapterRegistry())
    try:
        with caplog.at_level(logging.WARNING):
            lease = engines.lease(loaded)
        assert lease is not None and isinstance(lease.engine, PagedEngine)
        lease.release()
    finally:
        engines.close()
    assert "runs on PyTorch, not llama.cpp: the llama.cpp library was not found" in caplog.text
    assert str(tmp_path) in caplog.text


def test_the_engine_choice_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENBOOK_CPU_ENGINE", "vulkan")
    with pytest.raises(InvalidOptionError, match="use llama.cpp or pytorch"):
        cpu_engine_choice()
    monkeypatch.delenv("QWENBOOK_CPU_ENGINE")
    assert cpu_engine_choice() == "llama.cpp"


def test_a_released_library_loads_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # The library loads once per process; a folder from another llama.cpp release is refused by name.
    lib = llama_library.library()
    assert lib is llama_library.library()
    assert (lib.folder / "_nlcBuildMetadata.json").is_file()



def test_loading_on_the_cpu_writes_the_copy_with_the_loads_progress(tiny_model_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from qwenbook_bridge.handlers.context import JobContext
    from qwenbook_bridge.handlers.dispatch import Handlers
    from qwenbook_bridge.protocol import make_message, validate_message

    monkeypatch.setenv("QWENBOOK_GGUF_CACHE", str(tmp_path))  # an empty cache: the copy is written here
    handlers = Handlers("cpu")
    events: list[dict[str, Any]] = []

    def emit(kind: str, content: dict[str, Any]) -> None:
        validate_message(make_message(kind, content, "s"))  # the stage is one the protocol names
        events.append(content)

    try:
        load = make_message("load", {"model": str(tiny_model_dir), "dtype": "fp32"}, "s")
        model_id = handlers.load(JobContext(load, threading.Event(), emit))["model"]["model_id"]
        copy = [e for e in events if e["stage"] == "cpu_chat"]
        assert copy and "GGUF copy" in copy[0]["message"] and copy[-1]["fraction"] == 1.0
        assert events[-1]["stage"] == "ready"  # the load is ready once its chat copy is made, not before
        engine = handlers.chat.engine(model_id)
        assert isinstance(engine, LlamaCppEngine) and engine.running and engine.gguf.parent == tmp_path
    finally:
        handlers.close()


def test_the_openai_server_on_the_cpu_decodes_on_llama_cpp(loaded: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # test_serving.py's replies through it equal the notebook chat's; here, which engine it took.
    from qwenbook_bridge.openai.server import OpenAIServer, ServeConfig

    server = OpenAIServer.for_loaded(loaded, ServeConfig(port=0, max_batch_size=32))
    try:
        assert isinstance(server.scheduler, LlamaCppEngine) and server.scheduler.config.max_batch_size == 8
    finally:
        server.scheduler.stop()
    monkeypatch.setenv("QWENBOOK_CPU_ENGINE", "pytorch")
    assert isinstance(OpenAIServer.for_loaded(loaded, ServeConfig(port=0)).scheduler, PagedEngine)
