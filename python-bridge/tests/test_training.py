"""The fine-tuning loop on the tiny model: learning, resume, cancel, checkpoints, options and failures."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from qwenbook_bridge.engine.train import checkpoints as ckpt
from qwenbook_bridge.engine.train.batches import collate
from qwenbook_bridge.engine.data.datasets import DatasetSpec
from qwenbook_bridge.engine.data.chat_encoding import build_dataset
from qwenbook_bridge.engine.errors import InvalidOptionError
from qwenbook_bridge.engine.train.loss import token_loss_sum
from qwenbook_bridge.engine.data.self_cognition import SelfCognition
from qwenbook_bridge.engine.model_parts import has_injected_adapters
from qwenbook_bridge.engine.train.loop import TrainingOutOfMemoryError, train
from qwenbook_bridge.engine.train.config import LoraSettings, TrainConfig

ROWS = [{"system": "简短", "instruction": f"问题{i}", "output": f"回答{i}号"} for i in range(12)]


def probe_logits(model, tok) -> torch.Tensor:
    ids = tok("你好，你是谁？", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def ask(model, tok, question: str) -> str:
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def run(model, tok, out: Path, rows=ROWS, cancel_at: int | None = None, **options):
    """Train with small defaults; returns (result, events). `cancel_at` cancels after that step."""
    events: list[tuple[str, dict]] = []
    cancel = threading.Event()

    def on_event(kind: str, content: dict) -> None:
        events.append((kind, content))
        if kind == "train_progress" and content["step"] == cancel_at:
            cancel.set()

    settings = dict(max_length=48, batch_size=2, grad_accum=1, epochs=1, lr=1e-3, lora=LoraSettings(r=4))
    settings.update(options)
    result = train(model, tok, [DatasetSpec(rows)], TrainConfig(output_dir=str(out), **settings),
                   on_event=on_event, cancel=cancel)
    return result, events


def progress(events, key="loss"):
    return [c[key] for k, c in events if k == "train_progress"]


def test_self_cognition_run_teaches_the_name_and_gives_the_base_back(model, tok, tmp_path):
    from peft import PeftModel

    before_logits = probe_logits(model, tok)
    base_answer = ask(model, tok, "你是谁？")
    assert "小黄" not in base_answer
    result, events = run(model, tok, tmp_path / "selfcog", rows=SelfCognition("小黄", "魔搭", languages=("zh",)).rows(),
                         max_length=64, batch_size=4, max_steps=40, lr=2e-2, schedule="cosine", seed=3,
                         lora=LoraSettings(r=16, alpha=32), log_every=10)
    losses = progress(events)
    assert result.status == "completed" and result.step == 40 and len(losses) == 4
    assert losses[-1] < 0.5 * losses[0]
    # The caller's model is exactly the base again: no adapter layers, same outputs, frozen flags untouched.
    assert not has_injected_adapters(model) and not model.training
    assert torch.equal(probe_logits(model, tok), before_logits)
    assert ask(model, tok, "你是谁？") == base_answer
    tuned = PeftModel.from_pretrained(model, result.adapter_path)
    assert "小黄" in ask(tuned, tok, "你是谁？")
    begin = events[0][1]
    assert events[0][0] == "train_begin" and begin["total_steps"] == 40 and begin["examples"] == 25
    last = [c for k, c in events if k == "train_progress"][-1]
    assert set(last) == {"step", "total_steps", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "eta_s",
                         "cpu_memory"}  # gpu_memory too on a GPU
    assert last["cpu_memory"] > 0
    assert last["eta_s"] == 0 and last["tokens_per_s"] > 0 and result.tokens_per_s > 0
    saved = json.loads((tmp_path / "selfcog" / "train_result.json").read_text(encoding="utf-8"))
    assert saved["status"] == "completed" and saved["checkpoints"] == [str(tmp_path / "selfcog" / "checkpoint-40")]


def test_resume_after_cancel_repeats_the_uninterrupted_run_step_for_step(model, tok, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    options = dict(grad_accum=2, epochs=2, eval_split=0.2, eval_every=2, schedule="cosine", warmup=0.2,
                   lora=LoraSettings(r=4, dropout=0.1))  # dropout makes the result depend on restored RNG state
    full, full_events = run(model, tok, tmp_path / "full", **options)
    assert full.total_steps == 6

    first, first_events = run(model, tok, tmp_path / "part", cancel_at=3, **options)
    assert first.status == "cancelled" and first.step == 3
    stopped = tmp_path / "part" / "checkpoint-3"
    assert first.adapter_path == str(stopped) and first.checkpoints == [str(stopped)]
    assert ("checkpoint", {"step": 3, "path": str(stopped), "reason": "cancel"}) in first_events
    # The cancelled checkpoint is a complete peft adapter folder.
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(stopped))
    state = json.loads((stopped / "run_state.json").read_text(encoding="utf-8"))
    assert state["step"] == 3 and state["data_position"] == {"epoch": 1, "step_in_epoch": 0,
                                                             "micro_batches_done": 0}

    rest, rest_events = run(model, tok, tmp_path / "part", resume_from=str(tmp_path / "part"), **options)
    assert rest.status == "completed" and rest.resumed_from == str(stopped)
    for key in ("loss", "grad_norm", "lr", "step"):
        assert progress(first_events, key) + progress(rest_events, key) == pytest.approx(
            progress(full_events, key), abs=1e-6, rel=0)
    evals = [c["eval_loss"] for k, c in full_events if k == "eval"]
    assert [c["eval_loss"] for k, c in first_events + rest_events if k == "eval"] == pytest.approx(evals, abs=1e-6)
    assert len(evals) == 3 and rest.best_eval_loss == pytest.approx(min(evals), abs=1e-6)
    a = load_file(Path(full.adapter_path) / "adapter_model.safetensors")
    b = load_file(Path(rest.adapter_path) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert rest.history == [h for h in rest.history if h["kind"] in ("train_progress", "eval")]
    assert [h["step"] for h in rest.history if h["kind"] == "train_progress"] == [1, 2, 3, 4, 5, 6]


def test_step_loss_does_not_depend_on_how_rows_split_into_micro_batches(model, tok, tmp_path):
    # Answers of different lengths, so a mean of per-micro-batch means would differ from the step's mean.
    rows = [{"system": "简短", "instruction": f"问题{i}", "output": "好" * (1 + 3 * i)} for i in range(8)]
    results = []
    for i, (batch, accum) in enumerate([(8, 1), (4, 2), (2, 4)]):
        result, events = run(model, tok, tmp_path / f"r{i}", rows=rows, batch_size=batch, grad_accum=accum,
                             max_steps=1)
        from safetensors.torch import load_file
        results.append((progress(events)[0], load_file(Path(result.adapter_path) / "adapter_model.safetensors")))
    (loss0, w0), *others = results
    for loss, w in others:
        assert loss == pytest.approx(loss0, abs=1e-5)
        assert all(torch.allclose(w[k], w0[k], atol=1e-6) for k in w0)


def test_packed_rows_do_not_attend_to_each_other(model, tok):
    rows = [{"instruction": "问题" * (i + 1), "output": "回答" * (3 - i)} for i in range(3)]
    examples = build_dataset([DatasetSpec(rows)], tok, 128).examples
    with torch.no_grad():
        alone = sum(float(token_loss_sum(model, collate(examples, [[0], [1], [2]], [i], 0, False))) for i in range(3))
        packed = collate(examples, [[0, 1, 2]], [0], 0, True)
        assert packed.attention_mask is None and packed.position_ids[0].tolist().count(0) == 3
        assert float(token_loss_sum(model, packed)) == pytest.approx(alone, rel=1e-5)
        # Two packed rows of different lengths: the padding forms its own block as well.
        two_rows = collate(examples, [[0, 1], [2]], [0, 1], 0, True)
        assert float(token_loss_sum(model, two_rows)) == pytest.approx(alone, rel=1e-5)
        # Control: the same packed row with a plain causal mask lets examples see each other.
        packed.attention_mask = torch.ones_like(packed.input_ids)
        assert float(token_loss_sum(model, packed)) != pytest.approx(alone, rel=1e-5)


def test_packing_and_gradient_checkpointing_runs(model, tok, tmp_path):
    plain, plain_events = run(model, tok, tmp_path / "plain", max_steps=2)
    ckpt_run, ckpt_events = run(model, tok, tmp_path / "gc", max_steps=2, gradient_checkpointing=True)
    assert progress(ckpt_events) == pytest.approx(progress(plain_events), abs=1e-6)
    assert not model.is_gradient_checkpointing
    packed, packed_events = run(model, tok, tmp_path / "packed", packing=True, max_length=128, batch_size=1, epochs=2)
    begin = packed_events[0][1]
    # 12 rows of ~25 tokens fit 5 to a 128-token row, so an epoch is 3 packed rows instead of 12.
    assert begin["steps_per_epoch"] == 3 and packed.step == 6
    assert all(torch.isfinite(torch.tensor(progress(packed_events))))


def test_full_fine_tune_writes_a_model_folder_and_restores_the_weights(model, tok, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result, events = run(model, tok, tmp_path / "full", rows=ROWS[:4], method="full", batch_size=4, max_steps=3,
                         schedule="constant", lr=1e-3)
    losses = progress(events)
    assert losses[0] > losses[1] > losses[2]
    assert result.model_path == str(tmp_path / "full") and result.adapter_path is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters())
    tuned = AutoModelForCausalLM.from_pretrained(result.model_path)
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])
    assert (Path(result.model_path) / "tokenizer_config.json").is_file()


def test_bf16_autocast_on_cpu(model, tok, tmp_path):
    result, events = run(model, tok, tmp_path / "bf16", max_steps=2, dtype="bf16")
    assert result.status == "completed" and all(l == l for l in progress(events))
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("schedule, warmup, expected", [
    ("cosine", 2, [1 / 3, 2 / 3, 1.0, 0.8535534, 0.5, 0.1464466]),
    ("linear", 0.5, [1 / 4, 2 / 4, 3 / 4, 1.0, 2 / 3, 1 / 3]),
    ("constant", 0, [1.0] * 6),
])
def test_learning_rate_schedules(model, tok, tmp_path, schedule, warmup, expected):
    _, events = run(model, tok, tmp_path / schedule, rows=ROWS[:2], max_steps=6, lr=1e-3, schedule=schedule,
                    warmup=warmup, max_length=24)
    assert progress(events, "lr") == pytest.approx([1e-3 * f for f in expected], rel=1e-5)


def test_periodic_checkpoints_and_eval(model, tok, tmp_path):
    result, events = run(model, tok, tmp_path / "run", epochs=1, eval_split=0.25, eval_every=2, save_every=2)
    assert result.total_steps == 5
    assert [c["step"] for k, c in events if k == "checkpoint"] == [2, 4, 5]
    assert [c["step"] for k, c in events if k == "eval"] == [2, 4, 5]
    assert [Path(p).name for p in result.checkpoints] == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    evals = [c["eval_loss"] for k, c in events if k == "eval"]
    assert result.best_eval_loss == min(evals) and result.final_eval_loss == evals[-1]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_checkpoints_are_written_atomically(tmp_path):
    def broken(folder: Path) -> None:
        (folder / "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.write_checkpoint(tmp_path, 7, broken, {}, {"step": 7}, {})
    assert list(tmp_path.iterdir()) == []
    # A leftover from a crash mid-write is never taken for a checkpoint.
    (tmp_path / ".tmp-checkpoint-9-x").mkdir()
    (tmp_path / ".tmp-checkpoint-9-x" / "trainer_state.json").write_text("{}")
    good = ckpt.write_checkpoint(tmp_path, 3, lambda f: None, {"x": 1}, {"step": 3}, {})
    assert ckpt.resolve_checkpoint(tmp_path) == good and ckpt.list_checkpoints(tmp_path) == [good]
    ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]


@pytest.mark.parametrize("options, message", [
    (dict(eval_split=1.5), "eval_split must be a fraction in [0, 1), got 1.5"),
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(lr=0), "lr must be a positive number, got 0"),
    (dict(lr=-1e-4), "lr must be a positive number"),
    (dict(grad_accum=1.5), "grad_accum must be a positive integer"),
    (dict(warmup=2.5), "warmup must be a fraction"),
    (dict(schedule="step"), "schedule must be"),
    (dict(eval_every=10), "eval_every is set but eval_split is 0"),
    (dict(lora=LoraSettings(r=0)), "lora r must be a positive integer"),
    (dict(lora=LoraSettings(targets=["q_proj", "attn.c_proj"])), "unknown LoRA target module(s) ['attn.c_proj']; "
     "this model's linear modules are: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    (dict(dtype="fp16"), "dtype 'fp16' needs a CUDA GPU"),
    (dict(resume_from="/nonexistent/checkpoint-5"), "checkpoint not found"),
    (dict(rows=[]), "has no rows"),
])
def test_options_that_cannot_work_fail_before_training(model, tok, tmp_path, options, message):
    rows = options.pop("rows", ROWS)
    before = probe_logits(model, tok)
    with pytest.raises(Exception, match=None) as err:
        run(model, tok, tmp_path / "out", rows=rows, **options)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()
    assert not has_injected_adapters(model) and torch.equal(probe_logits(model, tok), before)


def test_config_from_wire_dict():
    cfg = TrainConfig.from_dict({"output_dir": "runs/a", "lora": {"r": 8, "alpha": 32, "targets": ["q_proj"]},
                                 "adam_betas": [0.9, 0.95], "eval_split": 0.1, "eval_every": 50})
    cfg.validate()
    assert cfg.lora.targets == ["q_proj"] and cfg.adam_betas == (0.9, 0.95)
    with pytest.raises(InvalidOptionError, match="unknown training option 'learning_rate'"):
        TrainConfig.from_dict({"output_dir": "a", "learning_rate": 1e-4})
    with pytest.raises(InvalidOptionError, match="did you mean 'dropout'"):
        TrainConfig.from_dict({"output_dir": "a", "lora": {"dropuot": 0.1}})
    with pytest.raises(InvalidOptionError, match="output_dir is required"):
        TrainConfig.from_dict({})


def test_existing_run_folder_needs_resume_or_overwrite_and_resume_checks_the_setup(model, tok, tmp_path):
    run(model, tok, tmp_path / "run", max_steps=2)
    with pytest.raises(InvalidOptionError, match="already holds checkpoints"):
        run(model, tok, tmp_path / "run", max_steps=2)
    with pytest.raises(InvalidOptionError, match="r: checkpoint 4, now 8"):
        run(model, tok, tmp_path / "run", max_steps=4, resume_from=str(tmp_path / "run"), lora=LoraSettings(r=8))
    with pytest.raises(InvalidOptionError, match="already at step 2 of 2"):
        run(model, tok, tmp_path / "run", max_steps=2, resume_from=str(tmp_path / "run"))
    result, _ = run(model, tok, tmp_path / "run", max_steps=1, overwrite=True)
    assert [Path(p).name for p in result.checkpoints] == ["checkpoint-1"]


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to "
                 "allocate 1 bytes. out of memory"),
])
def test_out_of_memory_ends_the_run_with_a_hint_and_a_usable_base(model, tok, tmp_path, error):
    before = probe_logits(model, tok)
    calls = {"n": 0}

    def explode(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:
            raise error

    handle = model.model.layers[0].register_forward_hook(explode)
    try:
        with pytest.raises(TrainingOutOfMemoryError) as err:
            run(model, tok, tmp_path / "oom", max_steps=5)
    finally:
        handle.remove()
    text = str(err.value)
    for hint in ("out of memory", "at step 3", "smaller batch_size (now 2)", "gradient_checkpointing=True",
                 "shorter max_length (now 48)", "still loaded"):
        assert hint in text
    assert not has_injected_adapters(model) and torch.equal(probe_logits(model, tok), before)
    assert all(p.grad is None for p in model.parameters())


def test_training_refuses_a_model_with_adapters_loaded(model, tok, tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(InvalidOptionError, match="has adapters loaded"):
        run(model, tok, tmp_path / "out", max_steps=1)
