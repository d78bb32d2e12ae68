"""Which loop a chat request decodes on (engine/generate/decoders.py): the fast decoder where it applies, kept per model
and grown for longer requests, and the plain loop for adapters and layers it cannot read."""

from __future__ import annotations

import copy

import pytest

from qwenbook_bridge.engine import SamplingParams
from qwenbook_bridge.engine.generate.generation import generate
from qwenbook_bridge.engine.generate.fast_decode import FastDecoder
from qwenbook_bridge.engine.generate.decoders import _decoders, decoder_for, forget

CHAT = [{"role": "user", "content": "你好，你是谁？"}]


@pytest.fixture(autouse=True)
def fresh(tiny, monkeypatch):
    monkeypatch.setenv("QWENBOOK_FAST_DECODE", "1")
    forget(tiny.model)
    yield
    forget(tiny.model)


def test_chat_runs_on_one_decoder_per_model_that_grows_for_longer_requests(tiny):
    first = generate(tiny, CHAT, SamplingParams(max_tokens=8, greedy=True))
    decoder = _decoders.get(tiny.model)
    assert isinstance(decoder, FastDecoder) and decoder.max_seq_len >= 2048
    generate(tiny, CHAT, SamplingParams(max_tokens=8, greedy=True))
    assert _decoders.get(tiny.model) is decoder  # kept: no new cache, no new graphs
    longer = generate(tiny, CHAT, SamplingParams(max_tokens=decoder.max_seq_len, greedy=True))
    grown = _decoders.get(tiny.model)
    assert grown is not decoder and grown.max_seq_len >= longer.prompt_tokens + longer.completion_tokens
    assert longer.token_ids[:8] == first.token_ids


def test_the_mode_switch_and_the_cpu_default(tiny, monkeypatch):
    monkeypatch.setenv("QWENBOOK_FAST_DECODE", "0")
    assert decoder_for(tiny.model, tiny.device, 64, 32768) is None
    monkeypatch.setenv("QWENBOOK_FAST_DECODE", "auto")  # auto: on CUDA only
    assert decoder_for(tiny.model, tiny.device, 64, 32768) is None
    monkeypatch.setenv("QWENBOOK_FAST_DECODE", "1")
    assert decoder_for(tiny.model, tiny.device, 64, 32768) is not None
    assert decoder_for(tiny.model, tiny.device, 40000, 32768) is None  # more than the model's context


def test_a_model_with_adapter_layers_decodes_on_the_plain_loop_with_its_adapter(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    plain = generate(tiny, CHAT, SamplingParams(max_tokens=12, greedy=True))
    peft_model = get_peft_model(tiny.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    try:
        assert decoder_for(tiny.model, tiny.device, 64, 32768) is None
        with_adapter = generate(tiny, CHAT, SamplingParams(max_tokens=12, greedy=True))
        assert with_adapter.token_ids != plain.token_ids  # the adapter's random B changes the reply
    finally:
        peft_model.unload()
    assert generate(tiny, CHAT, SamplingParams(max_tokens=12, greedy=True)).token_ids == plain.token_ids


def test_adapters_loaded_but_switched_off_keep_the_fast_decoder_with_base_tokens(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    from qwenbook_bridge.engine.models.adapters import AdapterManager

    plain = generate(tiny, CHAT, SamplingParams(max_tokens=12, greedy=True))
    folder = tmp_path / "adapter"
    get_peft_model(copy.deepcopy(tiny.model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False)).save_pretrained(folder)
    manager = AdapterManager(tiny.model)
    manager.load(folder, "a", activate=False)  # as the worker keeps its adapters: loaded, none in use
    try:
        forget(tiny.model)
        assert decoder_for(tiny.model, tiny.device, 64, 32768) is not None  # peft's layers add nothing now
        assert generate(tiny, CHAT, SamplingParams(max_tokens=12, greedy=True)).token_ids == plain.token_ids
        with manager.using("a"):  # switched on: the plain loop, with the adapter
            assert decoder_for(tiny.model, tiny.device, 64, 32768) is None
            with_adapter = generate(tiny, CHAT, SamplingParams(max_tokens=12, greedy=True))
            assert with_adapter.token_ids != plain.token_ids
    finally:
        manager.unload_all()


def plain_then_fast(loaded, messages, options, monkeypatch, fast_mode="1"):
    """The same request on the plain loop, then with the fast decoder switched on (checked to be the one used)."""
    monkeypatch.setenv("QWENBOOK_FAST_DECODE", "0")
    plain = generate(loaded, messages, options)
    monkeypatch.setenv("QWENBOOK_FAST_DECODE", fast_mode)
    fast = generate(loaded, messages, options)
    assert isinstance(_decoders.get(loaded.model), FastDecoder)
    return plain, fast


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_model_chats_on_the_fast_decoder_with_the_plain_loops_tokens(tiny_model_dir, monkeypatch, method):
    from qwenbook_bridge.engine import LoadOptions, load_model

    loaded = load_model(str(tiny_model_dir), LoadOptions(dtype="fp32", device="cpu",
                                                          quant={"method": method, "group_size": 32}))
    plain, fast = plain_then_fast(loaded, CHAT, SamplingParams(max_tokens=24, greedy=True), monkeypatch)
    assert fast.token_ids == plain.token_ids
