"""Fine-tuning Qwen3 and Qwen3-MoE on the tiny random models.

Masks under Qwen3's template: the last answer is trained with the reasoning block the template writes before it
(the row's own `<think>` block, or an empty one for rows without reasoning: with thinking on the model writes
it itself); answers before the last user message are trained as the template keeps them, without their
reasoning, and the dataset notes count the dropped reasoning. The preview shows exactly these spans. A
self-cognition run teaches the tiny Qwen3 its name as the Qwen2 test does, and Qwen3-MoE trains LoRA on its
attention projections and, through peft's target_parameters, on its experts."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from qwenbook_bridge.engine.data.chat_encoding import build_dataset, label_segments, preview
from qwenbook_bridge.engine.data.datasets import DatasetSpec
from qwenbook_bridge.engine.data.self_cognition import SelfCognition
from qwenbook_bridge.engine.errors import InvalidOptionError
from qwenbook_bridge.engine.model_parts import has_injected_adapters
from qwenbook_bridge.engine.train.config import LoraSettings, TrainConfig
from qwenbook_bridge.engine.train.loop import train

EMPTY_THINK = "<think>\n\n</think>\n\n"
ALPACA = [
    {"instruction": "What is 2+2?", "output": "4"},
    {"instruction": "What is 3+3?", "output": "<think>Three and three make six.</think>6"},
    {"instruction": "And 5+5?", "output": "<think>\nFive twice.\n</think>\n\n10",
     "history": [["What is 1+1?", "<think>One and one.</think>2"]]},
]
SHAREGPT = [{"conversations": [
    {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "<think>A greeting.</think>Hello!"},
    {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye!"}]}]


@pytest.fixture(scope="module")
def tok3(tiny_qwen3_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3_dir)


def trained(tok: Any, ids: list[int], labels: list[int]) -> list[str]:
    return [s["text"] for s in label_segments(tok, ids, labels) if s["trained"]]


def test_alpaca_rows_with_and_without_reasoning_train_the_reasoning_block_and_the_answer(tok3):
    data = build_dataset([DatasetSpec(ALPACA, format="alpaca")], tok3, 512, seed=0)
    by_row = {ex.row: ex for ex in data.examples}
    texts = {row: trained(tok3, ex.input_ids, ex.labels) for row, ex in by_row.items()}
    assert texts[1] == [f"{EMPTY_THINK}4<|im_end|>"]
    # Reasoning written tightly is trained as the template writes it (its own newlines around it).
    assert texts[2] == ["<think>\nThree and three make six.\n</think>\n\n6<|im_end|>"]
    # The history's answer loses its reasoning, as Qwen3's template drops it before the last user message.
    assert texts[3] == ["2<|im_end|>", "<think>\nFive twice.\n</think>\n\n10<|im_end|>"]
    for ex in data.examples:  # the ids are exactly Qwen3's rendering of the row
        untrained = "".join(s["text"] for s in label_segments(tok3, ex.input_ids, ex.labels) if not s["trained"])
        assert "<think>" not in untrained and untrained.endswith("\n")
    assert tok3.decode(by_row[3].input_ids).count("One and one") == 0
    assert any("1 assistant turns before a row's last user message have reasoning" in n for n in data.stats.notes)
    assert data.stats.retokenized_boundaries == 0


def test_sharegpt_multi_turn_rows_and_the_preview_show_the_same_spans(tok3):
    spec = DatasetSpec(SHAREGPT, format="sharegpt")
    [ex] = build_dataset([spec], tok3, 512).examples
    assert trained(tok3, ex.input_ids, ex.labels) == ["Hello!<|im_end|>", f"{EMPTY_THINK}Goodbye!<|im_end|>"]
    assert tok3.decode(ex.input_ids) == tok3.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>A greeting.</think>Hello!"},
         {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}], tokenize=False)
    [shown] = preview([spec], tok3, 1)
    assert [s["text"] for s in shown["segments"] if s["trained"]] == ["Hello!<|im_end|>",
                                                                        f"{EMPTY_THINK}Goodbye!<|im_end|>"]
    assert shown["trained_tokens"] == ex.trained_tokens


def test_the_workers_train_preview_shows_qwen3s_trained_spans(tiny_qwen3_dir: Path):
    from qwenbook_bridge.handlers.context import JobContext
    from qwenbook_bridge.handlers.dispatch import Handlers
    from qwenbook_bridge.protocol import make_message

    handlers = Handlers("cpu")
    try:
        load = make_message("load", {"model": str(tiny_qwen3_dir), "dtype": "fp32"}, "s")
        model_id = handlers.load(JobContext(load, threading.Event(), lambda *_: None))["model"]["model_id"]
        datasets = [{"rows": ALPACA[1:], "format": "alpaca"}, {"rows": SHAREGPT, "format": "sharegpt"}]
        msg = make_message("train_preview", {"model_id": model_id, "datasets": datasets, "n": 3}, "s")
        reply = handlers.train.preview(JobContext(msg, threading.Event(), lambda *_: None))
    finally:
        handlers.close()
    shown = [[s["text"] for s in e["segments"] if s["trained"]] for e in reply["examples"]]
    assert sorted(shown) == sorted([["<think>\nThree and three make six.\n</think>\n\n6<|im_end|>"],
                                    ["2<|im_end|>", "<think>\nFive twice.\n</think>\n\n10<|im_end|>"],
                                    ["Hello!<|im_end|>", f"{EMPTY_THINK}Goodbye!<|im_end|>"]])


def ask(model: Any, tok: Any, question: str, **template: Any) -> str:
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True, **template)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def run(model: Any, tok: Any, out: Path, rows: list[dict[str, Any]], **options: Any):
    events: list[tuple[str, dict[str, Any]]] = []
    settings: dict[str, Any] = dict(max_length=64, batch_size=2, grad_accum=1, epochs=1, lr=1e-3,
                                    lora=LoraSettings(r=4))
    settings.update(options)
    result = train(model, tok, [DatasetSpec(rows)], TrainConfig(output_dir=str(out), **settings),
                   on_event=lambda kind, content: events.append((kind, content)), cancel=threading.Event())
    return result, [c["loss"] for k, c in events if k == "train_progress"]


def test_self_cognition_run_teaches_the_tiny_qwen3_its_name(tiny_qwen3_dir: Path, tok3, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.float32).eval()
    assert "小黄" not in ask(model, tok3, "你是谁？")
    result, losses = run(model, tok3, tmp_path / "selfcog", SelfCognition("小黄", "魔搭", languages=("zh",)).rows(),
                         max_length=80, batch_size=4, max_steps=40, lr=2e-2, schedule="cosine", seed=3,
                         lora=LoraSettings(r=16, alpha=32), log_every=10)
    assert result.status == "completed" and losses[-1] < 0.5 * losses[0]
    assert not has_injected_adapters(model)
    tuned = PeftModel.from_pretrained(model, result.adapter_path)
    # With thinking on (the template's default) it writes the empty reasoning block itself, then the name;
    # with thinking off the template writes the block and the name follows.
    thinking = ask(tuned, tok3, "你是谁？")
    assert thinking.startswith(EMPTY_THINK) and "小黄" in thinking, thinking
    assert "小黄" in ask(tuned, tok3, "你是谁？", enable_thinking=False)


ROWS = [{"instruction": f"问题{i}", "output": f"回答{i}号"} for i in range(8)]


def test_qwen3_moe_trains_lora_on_attention_and_on_the_experts(tiny_qwen3_moe_dir: Path, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen3_moe_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe_dir, dtype=torch.float32).eval()
    probe = tok("你好", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(probe).logits
    result, losses = run(model, tok, tmp_path / "moe", ROWS, max_steps=12, lr=1e-2, seed=1)
    assert result.status == "completed" and losses[-1] < losses[0]
    saved = json.loads((Path(result.adapter_path) / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert sorted(saved["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    weights = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(
        Path(result.adapter_path) / "adapter_model.safetensors"))
    assert any(".mlp.experts." in k for k in weights) and any(".self_attn.q_proj." in k for k in weights)
    assert not has_injected_adapters(model)
    with torch.no_grad():
        assert torch.equal(model(probe).logits, before)  # the caller's model is the base again
        tuned = PeftModel.from_pretrained(model, result.adapter_path)
        assert not torch.allclose(tuned(probe).logits, before)


def test_qwen3_moe_attention_only_and_experts_only_targets(tiny_qwen3_moe_dir: Path, tmp_path: Path, tiny_qwen3_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen3_moe_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe_dir, dtype=torch.float32).eval()
    attention, _ = run(model, tok, tmp_path / "attn", ROWS, max_steps=2,
                       lora=LoraSettings(r=4, targets=["q_proj", "v_proj"]))
    saved = json.loads((Path(attention.adapter_path) / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"] and not saved.get("target_parameters")
    experts, _ = run(model, tok, tmp_path / "experts", ROWS, max_steps=2, lora=LoraSettings(r=4, targets=["experts"]))
    saved = json.loads((Path(experts.adapter_path) / "adapter_config.json").read_text())
    assert not saved["target_modules"] and sorted(saved["target_parameters"]) == ["experts.down_proj",
                                                                                 "experts.gate_up_proj"]
    with pytest.raises(InvalidOptionError, match="experts cannot use dropout.*k_proj, o_proj, q_proj, v_proj"):
        run(model, tok, tmp_path / "dropout", ROWS, max_steps=1, lora=LoraSettings(r=4, dropout=0.1))
    dropout, _ = run(model, tok, tmp_path / "attn-dropout", ROWS, max_steps=1,
                     lora=LoraSettings(r=4, dropout=0.1, targets=["q_proj", "v_proj"]))
    assert dropout.status == "completed"
    dense = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.float32)
    with pytest.raises(InvalidOptionError, match=r"unknown LoRA target module\(s\) \['experts'\]"):
        run(dense, tok, tmp_path / "dense", ROWS, max_steps=1, lora=LoraSettings(r=4, targets=["experts"]))
