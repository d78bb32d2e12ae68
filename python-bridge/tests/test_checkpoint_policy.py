"""Selective checkpointing (engine/train/checkpoint_policy.py): layers that keep their narrow activations (and,
within budget, the MLP's) compute the same gradients as whole-layer checkpointing while recomputing less; the
trainer turns it on for compiled LoRA runs within the activation-memory budget and takes it off again.

The GPU side (compiled steps equal eager ones, memory as planned) is tests_gpu/test_checkpoint_policy_cuda.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qwenbook_bridge.engine.train import checkpoint_policy, fast_lora
from qwenbook_bridge.engine.train.config import LoraSettings, TrainConfig
from qwenbook_bridge.engine.train.trainable import Trainable, decoder_layers

RANK = 4
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _AdapterSums(TorchDispatchMode):
    """Counts projections computed with their adapter's product added: an addmm of [tokens, r] by B^T, a transposed
    [r, out] view (fast_lora's backward adds its adapter term to the input gradient by the contiguous A instead).
    Around backward that counts the projections run again; ops a selective checkpoint hands back from what it kept
    never reach this mode."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in (torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default) and args[1].shape[-1] == RANK \
                and args[2].shape[0] == RANK and args[2].stride(0) == 1:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _adapted(model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=8, target_modules=PROJECTIONS, bias="none",
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():  # B starts at zero; nonzero, every adapter's product reaches the loss
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    fast_lora.install(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return peft_model


def _step(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    with _AdapterSums() as sums:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, sums.count


def test_selective_layers_give_whole_layer_gradients_and_recompute_only_what_they_did_not_keep(model) -> None:
    _adapted(model)
    layers = decoder_layers(model)
    assert len(layers) == 2
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, use_cache=False).logits
    model.train()
    loss, grads, whole = _step(model, ids)
    assert whole == 7 * len(layers)  # every projection of every layer runs again in backward

    # Layer 0 keeps attention's activations (recomputes gate and up), layer 1 keeps the MLP's too.
    checkpoint_policy.apply(layers, checkpoint_policy.Plan(2, 1, 0, 0), model.config.hidden_size, RANK)
    with torch.no_grad():  # evaluation passes straight through
        torch.testing.assert_close(model.eval()(input_ids=ids, use_cache=False).logits, logits, rtol=0, atol=0)
    model.train()
    loss2, grads2, selective = _step(model, ids)
    assert selective == 2
    assert torch.equal(loss, loss2)
    for name, g in grads.items():
        torch.testing.assert_close(grads2[name], g, rtol=1e-5, atol=1e-7, msg=name)

    checkpoint_policy.remove(layers)
    assert all("forward" not in layer.__dict__ and layer.gradient_checkpointing for layer in layers)
    assert _step(model, ids)[2] == whole


def test_the_plan_spends_the_budget_on_attention_first_then_on_whole_mlps() -> None:
    qwen25_7b = SimpleNamespace(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                                intermediate_size=18944)
    tokens = 2 * 2048
    narrow = tokens * 2 * (2 * 3584 + 2 * 512 + 3584) + tokens * 4 * 28  # q, k, v, attention out, o; + log-sum-exp
    wide = tokens * 2 * 2 * 18944
    assert checkpoint_policy.plan(qwen25_7b, 28, tokens, 2, 0) == checkpoint_policy.Plan(0, 0, narrow, wide)
    assert checkpoint_policy.plan(qwen25_7b, 28, tokens, 2, 10 * narrow + 1).selective == 10
    p = checkpoint_policy.plan(qwen25_7b, 28, tokens, 2, 4.5 * 2**30)
    assert (p.selective, p.wide) == (28, 6) and p.extra_bytes <= 4.5 * 2**30
    assert checkpoint_policy.plan(qwen25_7b, 28, tokens, 2, 1e12) == checkpoint_policy.Plan(28, 28, narrow, wide)


def test_without_a_budget_gpus_spend_a_quarter_of_their_free_memory_and_qlora_and_cpus_none() -> None:
    assert checkpoint_policy.auto_budget(40 * 2**30, quantized=False) == 10 * 2**30
    assert checkpoint_policy.auto_budget(40 * 2**30, quantized=True) == 0
    assert checkpoint_policy.auto_budget(None, quantized=False) == 0


def _trainable(model: Any, tmp_path: Any, **options: Any) -> Trainable:
    cfg = TrainConfig(output_dir=str(tmp_path), lora=LoraSettings(r=RANK), gradient_checkpointing=True, **options)
    cfg.validate()
    trainable = Trainable(model, cfg, tokenizer=None)
    trainable.prepare()
    return trainable


def test_a_compiled_lora_run_goes_selective_within_its_budget_and_restore_takes_it_off(model, tmp_path) -> None:
    one = checkpoint_policy.plan(model.config, 2, 4 * 1024, 4, 2**40).narrow_bytes
    trainable = _trainable(model, tmp_path, compile=True, activation_memory_gb=1.5 * one / 2**30)
    assert trainable.checkpoint_plan is not None and (trainable.checkpoint_plan.selective,
                                                      trainable.checkpoint_plan.wide) == (1, 0)
    first, last = decoder_layers(model)
    assert "forward" not in first.__dict__ and first.gradient_checkpointing  # whole-layer, as before
    assert last.__dict__["forward"].__func__ is checkpoint_policy._narrow_forward and not last.gradient_checkpointing
    assert "selective checkpointing: 1 of 2 layers" in trainable.notes[0]
    trainable.restore()
    assert all("forward" not in layer.__dict__ for layer in (first, last))
    assert not any(getattr(m, "_lora_traceable", False) for m in model.modules())


@pytest.mark.parametrize("options", [dict(compile=False, activation_memory_gb=8.0),
                                     dict(compile=True, activation_memory_gb=0.0),
                                     dict(compile=True)])  # no explicit budget: none on a CPU
def test_eager_runs_no_budget_and_cpus_recompute_whole_layers(model, tmp_path, options) -> None:
    trainable = _trainable(model, tmp_path, **options)
    assert trainable.checkpoint_plan is None
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))
    if not options["compile"]:
        assert "used by compiled LoRA runs" in trainable.notes[0]
    trainable.restore()


def test_a_negative_budget_is_refused_with_what_it_takes(tmp_path) -> None:
    from qwenbook_bridge.engine.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="activation_memory_gb must be a number of GiB >= 0"):
        TrainConfig(output_dir=str(tmp_path), activation_memory_gb=-1).validate()
