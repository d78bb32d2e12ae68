"""Qwen3 and Qwen3-MoE chat on the tiny random models: Qwen3's greedy replies (fp32) equal transformers' generate
on every decode loop a chat can take (the chat engine, the fast decoder, the plain forward loop) with the model's
own Qwen3 template; Qwen3-MoE loads and chats on transformers' forward with the same tokens, and says in the log,
once, why it is not on the fast path."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from qwenbook_bridge.engine import LoadOptions, SamplingParams, load_model
from qwenbook_bridge.engine.generate.decoders import _decoders, forget
from qwenbook_bridge.engine.generate.fast_decode import FastDecoder
from qwenbook_bridge.engine.generate.fast_ops import extract_weights
from qwenbook_bridge.engine.generate.generation import generate, prompt_ids
from qwenbook_bridge.handlers.context import JobContext
from qwenbook_bridge.handlers.dispatch import Handlers
from qwenbook_bridge.protocol import make_message

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about the moon."}]
TOKENS = 20


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3_dir: Path):
    return load_model(str(tiny_qwen3_dir), LoadOptions(dtype="fp32", device="cpu"))


@pytest.fixture(scope="module")
def qwen3_moe(tiny_qwen3_moe_dir: Path):
    return load_model(str(tiny_qwen3_moe_dir), LoadOptions(dtype="fp32", device="cpu"))


def hf_greedy(loaded: Any, messages: list[dict[str, str]], n: int) -> list[int]:
    """transformers' own generate on a fresh copy of the folder, from the prompt Qwen3's template renders."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(loaded, messages)])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def bridge_chat(handlers: Handlers, model_id: str, messages: list[dict[str, str]], n: int) -> dict[str, Any]:
    content = {"model_id": model_id, "messages": messages, "greedy": True, "max_tokens": n}
    return handlers.generate(JobContext(make_message("generate", content, "s"), threading.Event(), lambda *_: None))


def load(handlers: Handlers, folder: Path) -> str:
    msg = make_message("load", {"model": str(folder), "dtype": "fp32"}, "s")
    return handlers.load(JobContext(msg, threading.Event(), lambda *_: None))["model"]["model_id"]


def test_the_prompt_is_qwen3s_template(qwen3):
    text = qwen3.tokenizer.decode(prompt_ids(qwen3, CHAT))
    assert text == ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                    "<|im_start|>user\nTell me about the moon.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("fast", ["0", "1"], ids=["plain-loop", "fast-decoder"])
def test_qwen3_greedy_tokens_equal_transformers_without_the_chat_engine(qwen3, fast: str, monkeypatch):
    monkeypatch.setenv("QWENBOOK_FAST_DECODE", fast)
    forget(qwen3.model)
    try:
        reply = generate(qwen3, CHAT, SamplingParams(max_tokens=TOKENS, greedy=True))
        # The fast decoder really ran (it reads q_norm/k_norm), or really did not.
        assert isinstance(_decoders.get(qwen3.model), FastDecoder) == (fast == "1")
    finally:
        forget(qwen3.model)
    assert reply.token_ids == hf_greedy(qwen3, CHAT, TOKENS)


def test_qwen3_greedy_tokens_equal_transformers_on_the_chat_engine(tiny_qwen3_dir: Path, qwen3):
    expected = hf_greedy(qwen3, CHAT, TOKENS)
    second = CHAT + [{"role": "assistant", "content": "It is far."}, {"role": "user", "content": "How far?"}]
    handlers = Handlers("cpu")
    try:
        model_id = load(handlers, tiny_qwen3_dir)
        model = handlers.registry.get(model_id).model
        calls = []
        hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            assert bridge_chat(handlers, model_id, CHAT, TOKENS)["token_ids"] == expected
            assert bridge_chat(handlers, model_id, second, TOKENS)["token_ids"] == hf_greedy(qwen3, second, TOKENS)
        finally:
            hook.remove()
        engine = handlers.chat.engine(model_id)
        assert engine is not None and engine.stats().tokens_generated >= 2 * TOKENS
        assert calls == []  # every token came from the engine, none from the model's own forward
    finally:
        handlers.close()


def test_a_qwen3_adapter_decodes_from_a_chat_engine_slot_as_peft_does(tiny_qwen3_dir: Path, qwen3, tmp_path: Path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    def fresh() -> Any:
        return AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.float32).eval()

    torch.manual_seed(0)
    get_peft_model(fresh(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)) \
        .save_pretrained(tmp_path / "a")
    ids = torch.tensor([prompt_ids(qwen3, CHAT)])
    with torch.inference_mode():
        expected = PeftModel.from_pretrained(fresh(), str(tmp_path / "a")).eval().generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()
    handlers = Handlers("cpu")
    try:
        model_id = load(handlers, tiny_qwen3_dir)
        msg = make_message("adapter_load", {"model_id": model_id, "path": str(tmp_path / "a"), "name": "a"}, "s")
        handlers.adapter_jobs.adapter_load(JobContext(msg, threading.Event(), lambda *_: None))
        calls = []
        hook = handlers.registry.get(model_id).model.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            content = {"model_id": model_id, "messages": CHAT, "greedy": True, "max_tokens": TOKENS, "adapter": "a"}
            reply = handlers.generate(JobContext(make_message("generate", content, "s"), threading.Event(),
                                                 lambda *_: None))
        finally:
            hook.remove()
        assert reply["token_ids"] == expected != hf_greedy(qwen3, CHAT, TOKENS)
        assert calls == [] and [n.split("#")[0] for n in handlers.chat.engine(model_id).adapters()] == ["a"]
    finally:
        handlers.close()


def test_qwen3_moe_is_refused_by_the_fast_path_with_a_readable_reason(qwen3_moe):
    with pytest.raises(TypeError) as info:
        extract_weights(qwen3_moe.model)
    reason = str(info.value)
    assert reason.startswith("qwen3_moe is a mixture-of-experts model, which is not on the fast path yet")
    assert "transformers' own forward" in reason
    assert len(reason) <= 240  # the chat engine's log line keeps the first 240 characters


def test_qwen3_moe_loads_and_chats_on_transformers_forward_and_logs_why_once(tiny_qwen3_moe_dir: Path, qwen3_moe,
                                                                            caplog, monkeypatch):
    # The PyTorch path: on a CPU the model's chat runs on llama.cpp by default (test_llama_cpp_engine.py).
    monkeypatch.setenv("QWENBOOK_CPU_ENGINE", "pytorch")
    expected = hf_greedy(qwen3_moe, CHAT, TOKENS)
    handlers = Handlers("cpu")
    try:
        model_id = load(handlers, tiny_qwen3_moe_dir)
        assert handlers.registry.get(model_id).info["architecture"] == "Qwen3MoeForCausalLM"
        with caplog.at_level(logging.INFO):
            first = bridge_chat(handlers, model_id, CHAT, TOKENS)
            again = bridge_chat(handlers, model_id, CHAT, TOKENS)
        assert first["token_ids"] == again["token_ids"] == expected
        assert handlers.chat.engine(model_id) is None
        refusals = [r.getMessage() for r in caplog.records if "cannot run it" in r.getMessage()]
        assert len(refusals) == 1 and "qwen3_moe is a mixture-of-experts model" in refusals[0], refusals
    finally:
        handlers.close()


def test_qwen3_moe_chats_with_an_expert_adapter_as_peft_does(tiny_qwen3_moe_dir: Path, qwen3_moe, tmp_path: Path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    def fresh() -> Any:
        return AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe_dir, dtype=torch.float32).eval()

    torch.manual_seed(0)
    get_peft_model(fresh(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                       target_parameters=["experts.gate_up_proj", "experts.down_proj"])) \
        .save_pretrained(tmp_path / "experts")
    ids = torch.tensor([prompt_ids(qwen3_moe, CHAT)])
    with torch.inference_mode():
        tuned = PeftModel.from_pretrained(fresh(), str(tmp_path / "experts")).eval()
        expected = tuned.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS,
                                  do_sample=False)[0, ids.shape[1]:].tolist()
    handlers = Handlers("cpu")
    try:
        model_id = load(handlers, tiny_qwen3_moe_dir)
        msg = make_message("adapter_load", {"model_id": model_id, "path": str(tmp_path / "experts"), "name": "e"}, "s")
        info = handlers.adapter_jobs.adapter_load(JobContext(msg, threading.Event(), lambda *_: None))["adapter"]
        assert info["targets"] == ["q_proj", "v_proj", "experts.down_proj", "experts.gate_up_proj"]
        content = {"model_id": model_id, "messages": CHAT, "greedy": True, "max_tokens": TOKENS, "adapter": "e"}
        reply = handlers.generate(JobContext(make_message("generate", content, "s"), threading.Event(),
                                             lambda *_: None))
        assert reply["token_ids"] == expected != hf_greedy(qwen3_moe, CHAT, TOKENS)
    finally:
        handlers.close()


@pytest.mark.parametrize("engine", ["pytorch", "llama.cpp"])
@pytest.mark.parametrize("which", ["qwen3", "qwen3_moe"])
def test_the_openai_server_serves_qwen3_and_qwen3_moe_with_the_notebooks_greedy_text(which: str, engine: str, caplog,
                                                                                     request: pytest.FixtureRequest,
                                                                                     monkeypatch):
    import openai

    from qwenbook_bridge.engine.llama_cpp.engine import LlamaCppEngine

    from qwenbook_bridge.engine.generate.batching.scheduler import BatchScheduler
    from qwenbook_bridge.engine.generate.paged.scheduler import PagedEngine
    from qwenbook_bridge.openai.server import OpenAIServer, ServeConfig

    loaded = request.getfixturevalue(which)
    expected = generate(loaded, CHAT, SamplingParams(max_tokens=TOKENS, greedy=True)).text
    monkeypatch.setenv("QWENBOOK_CPU_ENGINE", engine)
    with caplog.at_level(logging.INFO):
        server = OpenAIServer.for_loaded(loaded, ServeConfig(port=0, model_name=which))
    server.start()
    try:
        if engine == "llama.cpp":  # the CPU's default for a base model, MoE too
            assert isinstance(server.scheduler, LlamaCppEngine)
        # On PyTorch: Qwen3 on the paged engine; Qwen3-MoE on the padded batch scheduler, the reason in the log.
        elif not isinstance(server.scheduler, PagedEngine if which == "qwen3" else BatchScheduler):
            raise AssertionError(f"{which} is served by {type(server.scheduler).__name__}")
        if which == "qwen3_moe" and engine == "pytorch":
            assert any("qwen3_moe is a mixture-of-experts model" in r.getMessage() for r in caplog.records)
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=which, messages=CHAT, max_tokens=TOKENS, temperature=0)
        assert reply.choices[0].message.content == expected
    finally:
        server.stop()
