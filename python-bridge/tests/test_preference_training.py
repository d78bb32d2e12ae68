"""Preference tuning (DPO, ORPO, SimPO) through the training loop on the tiny model: learning, the reference,
resume, the metrics in events / trainer_state.json / TensorBoard tags, and bad rows."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
import torch

from qwenbook_bridge.engine.data.datasets import DatasetError, DatasetSpec
from qwenbook_bridge.engine.data.preference_data import build_preference_dataset
from qwenbook_bridge.engine.train.batches import collate_pairs
from qwenbook_bridge.engine.train.config import LoraSettings, PreferenceSettings, TrainConfig
from qwenbook_bridge.engine.train.loop import train
from qwenbook_bridge.engine.train.preference import REFERENCE_FILE, pair_logps
from qwenbook_bridge.engine.train.reporting import series

# Chosen answers drawn from one alphabet, rejected from another: nothing in a random model prefers either.
CHOSEN, REJECTED = "春花秋月夜宫", "山水风云雷电"
_rng = random.Random(0)
PAIRS = [{"prompt": f"第{i}问", "chosen": "".join(_rng.choice(CHOSEN) for _ in range(4)),
          "rejected": "".join(_rng.choice(REJECTED) for _ in range(4))} for i in range(16)]


def run(model, tok, out: Path, rows=PAIRS, cancel_at: int | None = None, **options):
    events: list[tuple[str, dict]] = []
    cancel = threading.Event()

    def on_event(kind: str, content: dict) -> None:
        events.append((kind, content))
        if kind == "train_progress" and content["step"] == cancel_at:
            cancel.set()

    settings = dict(max_length=48, batch_size=4, grad_accum=1, max_steps=12, lr=5e-3, schedule="constant",
                    lora=LoraSettings(r=8), preference=PreferenceSettings("dpo"))
    settings.update(options)
    result = train(model, tok, [DatasetSpec(rows)], TrainConfig(output_dir=str(out), **settings),
                   on_event=on_event, cancel=cancel)
    return result, events


def accuracy(model, tok) -> float:
    """The fraction of training pairs whose chosen answer the model finds more likely than the rejected one."""
    data = build_preference_dataset([DatasetSpec(PAIRS)], tok, 48)
    with torch.no_grad():
        p = pair_logps(model, collate_pairs(data.examples, range(len(PAIRS)), tok.pad_token_id))
    return float((p.chosen > p.rejected).float().mean())


def letters(model, tok) -> tuple[int, int]:
    """Characters of the chosen and of the rejected alphabet in the greedy answers to the first 6 prompts."""
    text = ""
    for row in PAIRS[:6]:
        enc = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=5, do_sample=False)
        text += tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(c in CHOSEN for c in text), sum(c in REJECTED for c in text)


def test_dpo_raises_preference_accuracy_from_chance_to_one(model, tok, tmp_path):
    from peft import PeftModel

    before = accuracy(model, tok)
    result, events = run(model, tok, tmp_path / "dpo")
    curve = [c["rewards/accuracies"] for k, c in events if k == "train_progress"]
    margins = [c["rewards/margins"] for k, c in events if k == "train_progress"]
    # The adapter starts at zero, so the policy is its own reference at the first step: every reward is 0.
    assert curve[0] == 0 and margins[0] == 0
    assert min(curve[-6:]) == 1.0 and margins[-1] > 1.0
    trained = PeftModel.from_pretrained(model, result.adapter_path)
    after = accuracy(trained, tok)
    print(f"preference accuracy on the training pairs: {before:.2f} -> {after:.2f}; rewards/accuracies per step "
          f"{[round(a, 2) for a in curve]}")
    assert before <= 0.5 and after == 1.0
    assert result.preference == "dpo" and result.final_metrics["rewards/accuracies"] == 1.0
    state = json.loads((tmp_path / "dpo" / "trainer_state.json").read_text())
    assert state["log_history"][-1]["rewards/margins"] == pytest.approx(margins[-1])
    last = [c for k, c in events if k == "train_progress"][-1]
    assert series("train_progress", last)["train/rewards/margins"] == pytest.approx(margins[-1])
    assert not (tmp_path / "dpo" / REFERENCE_FILE).exists()  # the in-step reference: the adapter switched off


def test_dpo_on_an_sft_adapter_starts_from_it_uses_it_as_reference_and_moves_answers_toward_chosen(
        model, tok, tmp_path):
    from peft import PeftModel

    # The SFT adapter answers out of character (the rejected answers).
    sft_rows = [{"instruction": r["prompt"], "output": r["rejected"]} for r in PAIRS]
    sft, _ = run(model, tok, tmp_path / "sft", rows=sft_rows, preference=None, batch_size=8, lr=1e-2,
                 max_steps=16, lora=LoraSettings(r=8, dropout=0.1))
    with_sft = PeftModel.from_pretrained(model, sft.adapter_path)
    chosen_before, rejected_before = letters(with_sft, tok)
    with_sft.unload()
    result, events = run(model, tok, tmp_path / "dpo", init_adapter=sft.adapter_path)
    first = next(c for k, c in events if k == "train_progress")
    # Step 1 runs the SFT adapter itself, so its rewards against the stored reference are 0: it is the reference.
    # (Its LoRA dropout is off for the preference run, as in TRL; with it on, step 1 would already differ.)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert any("dropout 0.1 is off" in n for n in result.notes)
    assert first["logps/chosen"] < -1.0
    assert json.loads((tmp_path / "dpo" / REFERENCE_FILE).read_text())["logps"]
    trained = PeftModel.from_pretrained(model, result.adapter_path)
    chosen_after, rejected_after = letters(trained, tok)
    print(f"greedy answers, chosen/rejected alphabet characters: SFT {chosen_before}/{rejected_before}, "
          f"after DPO {chosen_after}/{rejected_after}")
    assert rejected_before >= 4 and rejected_after <= rejected_before // 2
    assert chosen_after - rejected_after > chosen_before - rejected_before


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_orpo_and_simpo_learn_the_preference_and_report_their_terms(model, tok, tmp_path, method):
    result, events = run(model, tok, tmp_path / method, preference=PreferenceSettings(method), max_steps=6,
                         eval_split=0.25, report=["tensorboard"])
    progress = [c for k, c in events if k == "train_progress"]
    assert progress[-1]["rewards/accuracies"] == 1.0 and progress[-1]["loss"] < progress[0]["loss"]
    if method == "orpo":
        assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(progress[-1])
        assert progress[-1]["log_odds_chosen"] > progress[0]["log_odds_chosen"]
    evaluation = next(c for k, c in events if k == "eval")
    assert "eval_rewards/margins" in evaluation and "eval/rewards/margins" in series("eval", evaluation)
    # TensorBoard reads the metrics back under TRL's tags, at the run's steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(result.reports["tensorboard"])
    acc.Reload()
    margins = [(e.step, e.value) for e in acc.Scalars("train/rewards/margins")]
    assert margins == pytest.approx([(c["step"], c["rewards/margins"]) for c in progress], rel=1e-5, abs=1e-7)
    assert "eval/rewards/accuracies" in acc.Tags()["scalars"]
    if method == "orpo":
        assert "train/log_odds_ratio" in acc.Tags()["scalars"]


def test_full_fine_tuning_dpo_resume_equals_the_uninterrupted_run(model, tok, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    options = dict(method="full", lr=1e-4, max_steps=2)
    whole, whole_events = run(model, tok, tmp_path / "whole", **options)
    first, _ = run(model, tok, tmp_path / "split", cancel_at=1, **options)
    assert first.status == "cancelled" and first.step == 1
    stored = (tmp_path / "split" / REFERENCE_FILE).read_text()
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    second, second_events = run(fresh, tok, tmp_path / "split", resume_from=str(tmp_path / "split"), **options)
    assert (tmp_path / "split" / REFERENCE_FILE).read_text() == stored
    losses = [c["loss"] for k, c in whole_events if k == "train_progress"][1:]
    resumed = [c["loss"] for k, c in second_events if k == "train_progress"]
    assert resumed == pytest.approx(losses, rel=1e-5)
    assert second.final_metrics["rewards/margins"] == pytest.approx(whole.final_metrics["rewards/margins"], rel=1e-4)

    # The resumed run read the stored reference rather than computing one: a copy of the run folder whose stored
    # chosen log-probs are all 1 nat lower resumes with margins 0.1 (beta x 1) higher.
    import shutil

    shutil.copytree(tmp_path / "split", tmp_path / "edited", ignore=shutil.ignore_patterns("checkpoint-2"))
    saved = json.loads(stored)
    saved["logps"] = [[c - 1.0, r] for c, r in saved["logps"]]
    (tmp_path / "edited" / REFERENCE_FILE).write_text(json.dumps(saved))
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    _, edited_events = run(fresh, tok, tmp_path / "edited", resume_from=str(tmp_path / "edited" / "checkpoint-1"),
                           **options)
    margins = [c["rewards/margins"] for k, c in second_events if k == "train_progress"]
    edited = [c["rewards/margins"] for k, c in edited_events if k == "train_progress"]
    assert edited[0] == pytest.approx(margins[0] + 0.1, abs=1e-4)


@pytest.mark.parametrize("row, where", [
    ({"prompt": "hi", "chosen": "a"}, 'row 2, field "rejected": is missing'),
    ({"prompt": "hi", "chosen": 3, "rejected": "b"}, 'row 2, field "chosen": must be a string'),
    ({"chosen": "a", "rejected": "b"}, 'row 2, field "prompt": give exactly one of'),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, 'row 2, field "messages[1]": must end with the user'),
    ({"prompt": "hi", "chosen": {"role": "user", "content": "x"}, "rejected": "b"},
     'row 2, field "chosen.role": must be the assistant'),
])
def test_bad_rows_fail_before_any_step_with_file_row_and_field(model, tok, tmp_path, row, where):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [PAIRS[0], row]) + "\n", encoding="utf-8")
    events: list[str] = []
    with pytest.raises(DatasetError) as e:
        train(model, tok, [DatasetSpec(str(path))], TrainConfig(output_dir=str(tmp_path / "out"),
                                                                 preference=PreferenceSettings("dpo")),
              on_event=lambda kind, _: events.append(kind))
    assert str(e.value).startswith(f"{path}, {where}")
    assert events == [] and not (tmp_path / "out").exists()
