"""Merging LoRA into the base and saving sharded safetensors folders that plain transformers loads."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from qwenbook_bridge.engine.files import atomic_write
from qwenbook_bridge.engine.files import save as save_mod
from qwenbook_bridge.engine.export.merge import NoAdapterError, merge_lora, model_tensor_sources, save_merged
from qwenbook_bridge.engine.model_parts import has_lora
from qwenbook_bridge.engine.files.save import InsufficientDiskSpaceError, SaveConfig, TargetExistsError, parse_size

PROMPTS = ["Hello world, this is a test.", "你好，你是谁？"]


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def with_lora(model, seed: int = 0, targets="all-linear"):
    """A LoRA adapter with random, non-zero B so that merging really changes the logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(copy.deepcopy(model), config).eval()


def logits(model, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def assert_merged_close(merged: torch.Tensor, adapter: torch.Tensor) -> None:
    """fp32 rounding of W + BA against W x + B(A x), through every layer: a few ulps of logits that reach 20,
    and how many depends on the CPU's kernels. A merge that missed the adapter is off by more than 0.1."""
    scale = adapter.abs().max().item()
    assert (merged - adapter).abs().max().item() < 2e-5 * scale


def test_merged_folder_loads_in_plain_transformers_with_adapter_logits(base, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model, tok = base
    pm = with_lora(model)
    before = {t: logits(pm, tok, t) for t in PROMPTS}
    assert (before[PROMPTS[0]] - logits(model, tok, PROMPTS[0])).abs().max() > 0.1, "the adapter must matter"
    events = []
    out = tmp_path / "merged"
    report = save_merged(pm, tok, out, SaveConfig(shard_size="150KB"), progress=events.append)

    # Several shards plus an index that names every tensor, in transformers' own layout.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and report.details["shards"] == len(shards)
    assert all((out / s).is_file() for s in shards)
    assert {f.path for f in report.sizes.files} >= {*shards, "config.json", "generation_config.json", "tokenizer.json"}

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not has_lora(loaded)
    for text in PROMPTS:
        assert_merged_close(logits(loaded, tok, text), before[text])
        # The caller's model still has its adapter and answers as before.
        assert torch.equal(logits(pm, tok, text), before[text])
    loaded_tok = AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "你好"}]
    assert loaded_tok.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
    assert GenerationConfig.from_pretrained(out).eos_token_id == model.generation_config.eos_token_id

    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and events[-1].stage == "done" and events[-1].fraction == 1.0
    assert events[-1].bytes_done == events[-1].bytes_total > 0
    assert {"prepare", "write", "tokenizer", "done"} <= {e.stage for e in events}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder may remain"


def test_streamed_merge_equals_peft_merge_and_unload(base) -> None:
    model, _ = base
    pm = with_lora(model, seed=1)
    ours = {s.name: s.load() for s in model_tensor_sources(pm, require_adapter=True)}
    theirs = copy.deepcopy(pm).merge_and_unload().state_dict()
    theirs.pop("lm_head.weight")  # tied to the embedding; transformers re-ties it on load
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=0), k


def test_merge_lora_returns_a_separate_merged_model(base) -> None:
    model, tok = base
    pm = with_lora(model, seed=2)
    merged = merge_lora(pm)
    assert not has_lora(merged) and has_lora(pm)
    assert_merged_close(logits(merged, tok, PROMPTS[1]), logits(pm, tok, PROMPTS[1]))


def test_merge_from_adapter_folder_leaves_the_base_as_it_was(base, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = base
    plain = copy.deepcopy(model)
    pm = with_lora(model, seed=3)
    pm.save_pretrained(tmp_path / "adapter")
    expected = logits(pm, tok, PROMPTS[0])
    save_merged(plain, tok, tmp_path / "merged", adapter=tmp_path / "adapter")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert_merged_close(logits(loaded, tok, PROMPTS[0]), expected)
    assert not has_lora(plain)
    assert torch.equal(logits(plain, tok, PROMPTS[0]), logits(model, tok, PROMPTS[0]))


def test_no_adapter_is_a_clear_error_and_writes_nothing(base, tmp_path: Path) -> None:
    model, tok = base
    with pytest.raises(NoAdapterError, match="no LoRA adapter"):
        save_merged(model, tok, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_non_empty_target_is_refused_unless_overwrite(base, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = base
    pm = with_lora(model, seed=4)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(TargetExistsError, match="overwrite=True"):
        save_merged(pm, tok, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    save_merged(pm, tok, out, SaveConfig(overwrite=True))
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(out)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]

    empty = tmp_path / "empty"
    empty.mkdir()
    save_merged(pm, tok, empty)  # an empty folder is fine without overwrite
    assert (empty / "config.json").is_file()


def test_not_enough_disk_space_is_refused_before_writing(base, tmp_path: Path, monkeypatch) -> None:
    model, tok = base
    pm = with_lora(model, seed=5)

    class Usage:
        total, used, free = 10**12, 10**12 - 10**6, 10**6

    monkeypatch.setattr(atomic_write.shutil, "disk_usage", lambda _p: Usage)
    with pytest.raises(InsufficientDiskSpaceError, match=r"needs about .* MB .* only 1.00 MB is free"):
        save_merged(pm, tok, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_writing_leaves_no_folder(base, tmp_path: Path, monkeypatch) -> None:
    model, tok = base
    pm = with_lora(model, seed=6)
    real = save_mod.write_safetensors_file
    calls = []

    def failing(path, sources, metadata, on_bytes):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk went away")
        real(path, sources, metadata, on_bytes)

    monkeypatch.setattr(save_mod, "write_safetensors_file", failing)
    with pytest.raises(OSError, match="disk went away"):
        save_merged(pm, tok, tmp_path / "merged", SaveConfig(shard_size="150KB"))
    assert list(tmp_path.iterdir()) == []


def test_dtype_cast_on_save(base, tmp_path: Path) -> None:
    from safetensors import safe_open

    model, tok = base
    report = save_merged(with_lora(model, seed=7), tok, tmp_path / "bf16", SaveConfig(dtype="bf16"))
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    weights = next(f.bytes for f in report.sizes.files if f.path == "model.safetensors")
    n_params = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    assert 2 * n_params <= weights < 2 * n_params * 1.01


@pytest.mark.parametrize("text,expected", [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("1.5GiB", 3 * 2**29),
                                           ("100 kb", 10**5), (4096, 4096)])
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["2 GBs", "", "-1MB", "0", "lots", 0, True])
def test_parse_size_rejects_bad_input(bad) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)
