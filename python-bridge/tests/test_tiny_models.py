"""The tiny random models (qwenbook_bridge/tiny.py) that tests and the offline demo use, one per architecture:
Qwen2 with the Qwen2.5 template, Qwen3 and Qwen3-MoE with the template the Qwen3 tokenizer ships (thinking and
tools), each loadable with transformers' Auto classes and ending a turn with <|im_end|>."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TOKENIZER_DIR
from qwenbook_bridge.tiny import ARCHS, Qwen3MoeTinyConfig, Qwen3TinyConfig, TinyConfig, config_for, main


def test_each_architecture_has_its_typed_config():
    assert type(config_for("qwen2")) is TinyConfig
    assert type(config_for("qwen3")) is Qwen3TinyConfig
    assert type(config_for("qwen3-moe")) is Qwen3MoeTinyConfig
    assert [config_for(a).arch for a in ARCHS] == list(ARCHS)
    with pytest.raises(ValueError, match="unknown tiny model architecture 'llama': pick one of qwen2, qwen3, "
                                         "qwen3-moe"):
        config_for("llama")


def test_qwen3_has_q_k_norms_an_explicit_head_dim_and_qwen3s_own_template(tiny_qwen3_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir)
    tok = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    cfg = model.config
    assert type(model).__name__ == "Qwen3ForCausalLM" and cfg.model_type == "qwen3"
    # Written down, and unlike hidden_size / heads (64 / 4 = 16), as in the real Qwen3 family.
    assert json.loads((tiny_qwen3_dir / "config.json").read_text())["head_dim"] == 32 != cfg.hidden_size // 4
    attn = model.model.layers[0].self_attn
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (32,)
    assert cfg.initializer_range == 0.5
    assert cfg.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    shipped = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())["chat_template"]
    assert tok.chat_template == shipped
    chat = [{"role": "user", "content": "hi"}]
    off = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    tools = [{"type": "function", "function": {"name": "add", "description": "Add", "parameters": {}}}]
    assert "<tools>" in tok.apply_chat_template(chat, tools=tools, add_generation_prompt=True, tokenize=False)


def test_qwen3_moe_has_a_few_experts_and_routes_each_token_to_two(tiny_qwen3_moe_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe_dir)
    cfg = model.config
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and cfg.model_type == "qwen3_moe"
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.head_dim) == (4, 2, 32)
    assert all(type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in model.model.layers)
    tok = AutoTokenizer.from_pretrained(tiny_qwen3_moe_dir)
    assert cfg.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert "enable_thinking" in tok.chat_template


def test_qwen2_keeps_the_qwen25_template(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert "enable_thinking" not in tok.chat_template and "<|im_start|>" in tok.chat_template


def test_the_command_line_builds_the_architecture_asked_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main([str(tmp_path / "m"), "--arch", "qwen3", "--tokenizer-dir", str(TOKENIZER_DIR)]) == 0
    assert "tiny Qwen3 model written to" in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    assert json.loads((tmp_path / "m" / "qwenbook-tiny.json").read_text())["arch"] == "qwen3"
    with pytest.raises(SystemExit):
        main([str(tmp_path / "n"), "--arch", "llama", "--tokenizer-dir", str(TOKENIZER_DIR)])
    assert not (tmp_path / "n").exists()
