"""Adapters on a loaded base: plain-peft compatibility, switching, disabling, unloading, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qwenbook_bridge.engine.models.adapters import AdapterError, AdapterManager
from qwenbook_bridge.engine.data.datasets import DatasetSpec
from qwenbook_bridge.engine.errors import InvalidOptionError
from qwenbook_bridge.engine.model_parts import has_injected_adapters
from qwenbook_bridge.engine.train.loop import train
from qwenbook_bridge.engine.train.config import LoraSettings, TrainConfig

ROWS = [{"system": "简短", "instruction": f"问题{i}", "output": f"回答{i}号"} for i in range(8)]


def fresh(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture
def model(tiny_model_dir):
    return fresh(tiny_model_dir)


@pytest.fixture(scope="module")
def random_adapters(tiny_model_dir, tmp_path_factory):
    """Two adapters with non-zero weights on different modules, written with plain peft."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("adapters")
    paths = {}
    for name, seed, targets in (("alpha", 1, ["q_proj", "v_proj"]), ("beta", 2, ["up_proj", "down_proj"])):
        torch.manual_seed(seed)
        peft_model = get_peft_model(fresh(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                      init_lora_weights=False))
        peft_model.save_pretrained(out / name)
        paths[name] = out / name
    return paths


def logits(model, tok) -> torch.Tensor:
    ids = tok("你好，你是谁？Who are you?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def plain_peft_logits(tiny_model_dir, path, tok) -> torch.Tensor:
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(fresh(tiny_model_dir), str(path)).eval(), tok)


def test_trained_adapter_loads_with_plain_peft_and_matches_the_engine(model, tok, tmp_path, tiny_model_dir):
    base = logits(model, tok)
    result = train(model, tok, [DatasetSpec(ROWS)],
                   TrainConfig(output_dir=str(tmp_path / "run"), max_length=48, batch_size=4, grad_accum=1,
                               max_steps=3, lr=1e-2, lora=LoraSettings(r=4)))
    manager = AdapterManager(model)
    info = manager.load(result.adapter_path)
    assert info.name == "run" and info.active and info.r == 4
    assert info.targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    engine = logits(model, tok)
    assert not torch.allclose(engine, base, atol=1e-3)
    assert torch.allclose(engine, plain_peft_logits(tiny_model_dir, result.adapter_path, tok), atol=1e-5)
    # The final checkpoint is an adapter folder too, with the same weights.
    checkpoint = Path(result.checkpoints[-1])
    assert torch.allclose(engine, plain_peft_logits(tiny_model_dir, checkpoint, tok), atol=1e-5)


def test_switch_disable_and_unload_without_reloading_the_base(model, tok, random_adapters, tiny_model_dir):
    base = logits(model, tok)
    expected = {n: plain_peft_logits(tiny_model_dir, p, tok) for n, p in random_adapters.items()}
    flags = [p.requires_grad for p in model.parameters()]
    manager = AdapterManager(model)
    manager.load(random_adapters["alpha"])
    manager.load(random_adapters["beta"], activate=False)
    assert manager.active == "alpha" and manager.names() == ["alpha", "beta"]
    # The base model object itself (what generation holds) answers with the active adapter.
    assert torch.allclose(logits(model, tok), expected["alpha"], atol=1e-5)
    manager.activate("beta")
    assert torch.allclose(logits(model, tok), expected["beta"], atol=1e-5)
    assert [i.active for i in manager.list()] == [False, True]
    manager.activate(None)
    assert torch.equal(logits(model, tok), base)
    with manager.using("alpha"):
        assert torch.allclose(logits(model, tok), expected["alpha"], atol=1e-5)
    assert manager.active is None and torch.equal(logits(model, tok), base)
    manager.activate("alpha")
    manager.unload("alpha")
    assert manager.active is None and manager.names() == ["beta"]
    manager.activate("beta")
    assert torch.allclose(logits(model, tok), expected["beta"], atol=1e-5)
    manager.unload("beta")
    assert manager.names() == [] and not has_injected_adapters(model)
    assert torch.equal(logits(model, tok), base)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_loading_the_same_folder_twice_is_a_no_op_and_names_are_checked(model, random_adapters):
    manager = AdapterManager(model)
    first = manager.load(random_adapters["alpha"])
    assert manager.load(random_adapters["alpha"]) == first
    with pytest.raises(AdapterError, match="already loaded from"):
        manager.load(random_adapters["beta"], name="alpha")
    with pytest.raises(InvalidOptionError, match="letters, digits"):
        manager.load(random_adapters["beta"], name="my.adapter")
    with pytest.raises(AdapterError, match=r"no adapter named 'gamma' is loaded \(loaded: alpha\)"):
        manager.activate("gamma")


def test_unusable_folders_give_clear_errors_and_leave_the_model_as_it_was(model, tok, tmp_path, random_adapters,
                                                                          tiny_model_dir):
    base = logits(model, tok)
    manager = AdapterManager(model)
    with pytest.raises(AdapterError, match="adapter folder not found"):
        manager.load(tmp_path / "missing")
    with pytest.raises(AdapterError, match="is a full model folder"):
        manager.load(tiny_model_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="not a peft adapter folder"):
        manager.load(tmp_path / "empty")
    foreign = tmp_path / "foreign"
    shutil.copytree(random_adapters["alpha"], foreign)
    cfg = json.loads((foreign / "adapter_config.json").read_text())
    cfg["target_modules"] = ["c_attn"]  # a GPT-2 module name: this adapter was made for another architecture
    (foreign / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="does not fit this model"):
        manager.load(foreign)
    assert not has_injected_adapters(model) and torch.equal(logits(model, tok), base)
    # A failed second adapter leaves the first one working.
    manager.load(random_adapters["alpha"])
    with pytest.raises(AdapterError, match="does not fit this model"):
        manager.load(foreign)
    assert manager.names() == ["alpha"] and manager.active == "alpha"
    assert torch.allclose(logits(model, tok), plain_peft_logits(tiny_model_dir, random_adapters["alpha"], tok),
                          atol=1e-5)


def test_training_while_adapters_are_loaded_goes_through_suspended(model, tok, tmp_path, random_adapters):
    manager = AdapterManager(model)
    manager.load(random_adapters["alpha"])
    manager.load(random_adapters["beta"])
    with_beta = logits(model, tok)
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_length=48, batch_size=4, max_steps=1,
                         lora=LoraSettings(r=2))
    with pytest.raises(InvalidOptionError, match="has adapters loaded"):
        train(model, tok, [DatasetSpec(ROWS)], config)
    with manager.suspended():
        assert not has_injected_adapters(model)
        result = train(model, tok, [DatasetSpec(ROWS)], config)
    assert result.status == "completed"
    assert manager.names() == ["alpha", "beta"] and manager.active == "beta"
    assert torch.allclose(logits(model, tok), with_beta, atol=1e-6)
