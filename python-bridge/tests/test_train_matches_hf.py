"""The engine's training step against the plain Hugging Face + peft recipe, step by step, on the tiny model.

Both runs start from the same weights and the same LoRA initialization (the same seed before peft injects the
adapters) and see the same batches, so in fp32 their losses and gradient norms must agree to rounding. Dropout
draws from the global generator in the same order in both, so that case must agree exactly as well.
"""

from __future__ import annotations


import pytest
import torch

from qwenbook_bridge.engine.data.chat_encoding import build_dataset
from qwenbook_bridge.engine.data.datasets import DatasetSpec
from qwenbook_bridge.engine.train.batches import DataSchedule, collate, make_units
from qwenbook_bridge.engine.train.loop import train
from qwenbook_bridge.engine.train.config import LoraSettings, TrainConfig

# Answers of different lengths, so batches carry padding and the attention mask matters.
ROWS = [{"instruction": f"第{i}个问题：今天做什么？", "output": "我们去散步，" * (1 + i % 4) + f"然后回家{i}。"}
        for i in range(10)]
PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def fresh_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def engine_run(tiny_model_dir, tok, out, steps: int, **options) -> tuple[list[float], list[float]]:
    events: list[dict] = []
    config = TrainConfig(output_dir=str(out), max_steps=steps, **options)
    train(fresh_model(tiny_model_dir), tok, [DatasetSpec(ROWS)], config,
          on_event=lambda kind, content: events.append(content) if kind == "train_progress" else None)
    return [e["loss"] for e in events], [e["grad_norm"] for e in events]


def hf_run(tiny_model_dir, tok, steps: int, config: TrainConfig) -> tuple[list[float], list[float]]:
    """The textbook loop: peft adapters, `model(input_ids, attention_mask, labels).loss` over full logits,
    backward, clip, AdamW. It reads the same batches the engine's schedule gives each step."""
    from peft import LoraConfig, get_peft_model

    model = fresh_model(tiny_model_dir)
    examples = build_dataset([DatasetSpec(ROWS)], tok, config.max_length, seed=config.seed).examples
    units = make_units(examples, config.max_length, False, config.seed)
    schedule = DataSchedule(len(units), config.batch_size, 1, config.seed)
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(model, LoraConfig(
        r=config.lora.r, lora_alpha=config.lora.scale_alpha, lora_dropout=config.lora.dropout,
        target_modules=PROJECTIONS, bias="none", task_type="CAUSAL_LM"))
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    losses, norms = [], []
    for step in range(steps):
        (unit_ids,) = schedule.step_units(step)
        batch = collate(examples, units, unit_ids, tok.pad_token_id, False)
        loss = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                          use_cache=False).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, norms


@pytest.mark.parametrize("dropout, checkpointing, steps", [(0.0, False, 5), (0.1, True, 3)])
def test_engine_loss_matches_hf_peft_step_by_step(tiny_model_dir, tok, tmp_path, dropout, checkpointing, steps):
    options = dict(max_length=64, batch_size=3, grad_accum=1, lr=1e-2, schedule="constant", seed=7,
                   lora=LoraSettings(r=4, dropout=dropout), gradient_checkpointing=checkpointing)
    ours, our_norms = engine_run(tiny_model_dir, tok, tmp_path / "run", steps, **options)
    theirs, their_norms = hf_run(tiny_model_dir, tok, steps, TrainConfig(output_dir="-", **options))
    assert len(ours) == len(theirs) == steps
    # The comparison means something only if training moves the loss well beyond the tolerance.
    assert theirs[-1] < theirs[0] - 0.1
    assert ours == pytest.approx(theirs, abs=1e-5, rel=0)
    assert our_norms == pytest.approx(their_norms, rel=1e-4)

