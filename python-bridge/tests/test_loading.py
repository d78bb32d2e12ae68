from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwenbook_bridge.engine import (DeviceUnavailableError, InvalidOptionError, LoadOptions, ModelNotFoundError,
    ModelNotLoadedError, ModelRegistry, NotACausalLMError, load_model, memory_snapshot, resolve_device)
from qwenbook_bridge.engine.models.hub import _progress_bar_class, is_hub_id, looks_like_path, resolve_hub_model
from qwenbook_bridge.engine.models.loading import resolve_dtype
from qwenbook_bridge.protocol import check


def test_loaded_model_info_matches_the_schema(tiny, tiny_model_dir):
    check("ModelInfo", tiny.info, "ModelInfo")
    info = tiny.info
    assert info["path"] == str(Path(tiny_model_dir).resolve())
    assert info["architecture"] == "Qwen2ForCausalLM"
    assert (info["dtype"], info["device"]) == ("fp32", "cpu")
    assert info["has_chat_template"] is True
    assert info["vocab_size"] == 151936 and info["context_length"] == 4096
    assert info["parameters"] == sum(p.numel() for p in tiny.model.parameters())
    assert tiny.model_id == f"{Path(tiny_model_dir).name}:fp32:cpu"
    assert 151645 in tiny.eos_token_ids  # <|im_end|> ends a chat turn


def test_registry_returns_the_resident_model_and_unload_frees_it(tiny_model_dir):
    registry = ModelRegistry(default_device="cpu")
    stages = []
    first, already = registry.load(str(tiny_model_dir), LoadOptions(), progress=lambda p: stages.append(p.stage))
    assert already is False and stages == ["tokenizer", "weights", "ready"]
    again, already = registry.load(str(tiny_model_dir) + "/", LoadOptions(dtype="fp32"))
    assert already is True and again is first
    assert [m["model_id"] for m in registry.infos()] == [first.model_id]
    assert registry.get(first.model_id) is first
    assert registry.unload(first.model_id) is True
    assert first.model is None
    with pytest.raises(ModelNotLoadedError, match="is not loaded"):
        registry.get(first.model_id)
    assert registry.unload(first.model_id) is False


def test_models_from_one_folder_share_its_tokenizer_until_a_file_in_it_changes(tiny_model_dir, tmp_path):
    # Reading the tokenizer is most of a tiny model's load; a worker reads one folder for each dtype and quant.
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    fp32 = load_model(str(folder), LoadOptions(dtype="fp32", device="cpu"))
    bf16 = load_model(str(folder), LoadOptions(dtype="bf16", device="cpu"))
    assert bf16.tokenizer is fp32.tokenizer
    (folder / "chat_template.jinja").write_text("{{ 'changed' }}", encoding="utf-8")
    again = load_model(str(folder), LoadOptions(dtype="fp32", device="cpu"))
    assert again.tokenizer is not fp32.tokenizer and again.tokenizer.chat_template == "{{ 'changed' }}"


def test_missing_folder_says_so(tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(ModelNotFoundError, match=r"does not exist") as info:
        load_model(str(missing))
    assert str(missing) in str(info.value) and "QWENBOOK_MODEL" in str(info.value)


def test_a_bert_folder_is_not_a_causal_lm(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100}))
    with pytest.raises(NotACausalLMError) as info:
        load_model(str(folder))
    message = str(info.value)
    assert str(folder) in message and "BertForMaskedLM" in message and "not a causal language model" in message


def test_a_folder_without_config_lists_what_it_holds(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(NotACausalLMError, match=r"has no config\.json.*notes\.txt, weights\.bin"):
        load_model(str(tmp_path))


def test_a_folder_missing_a_weight_shard_says_which(tmp_path, tiny_model_dir):
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(Path(tiny_model_dir) / "config.json", folder / "config.json")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelNotFoundError, match=r"2 of 2 weight shards are missing"):
        load_model(str(folder))


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache and a hub endpoint that refuses connections at once."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "hub"


def test_an_unknown_hub_id_without_network_fails_with_a_fix(empty_hub):
    with pytest.raises(ModelNotFoundError) as info:
        load_model("Qwen/definitely-not-a-model", LoadOptions(device="cpu"))
    message = str(info.value)
    assert "Qwen/definitely-not-a-model is not in the local Hugging Face cache" in message
    assert "could not be downloaded" in message and "QWENBOOK_MODEL" in message


def test_offline_mode_never_touches_the_network(empty_hub, monkeypatch):
    from huggingface_hub import HfApi, constants

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was contacted although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(HfApi, "model_info", no_network)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="downloads are off"):
        load_model("Qwen/Qwen2.5-7B-Instruct", LoadOptions(device="cpu"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelNotFoundError, match="local_files_only was set"):
        load_model("Qwen/Qwen2.5-7B-Instruct", LoadOptions(device="cpu", local_files_only=True))


def test_a_cached_hub_model_is_found_without_network(empty_hub, tiny_model_dir):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hub / "models--Qwen--Tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in Path(tiny_model_dir).resolve().iterdir():
        os.symlink(f, snapshot / f.name)
    path, downloaded = resolve_hub_model("Qwen/Tiny", None, local_files_only=False)
    assert path == snapshot and downloaded is False


def test_source_kinds_are_told_apart():
    assert is_hub_id("Qwen/Qwen2.5-7B-Instruct")
    assert not is_hub_id("Qwen 2.5") and not is_hub_id("a/b/c")
    assert looks_like_path("./models/x") and looks_like_path("/abs/model") and looks_like_path("~/m")
    assert looks_like_path("models/qwen/7b") and not looks_like_path("Qwen/Qwen2.5-7B-Instruct")
    with pytest.raises(ModelNotFoundError, match="neither an existing folder nor a hub id"):
        load_model("no such model", LoadOptions(device="cpu"))


def test_download_progress_reports_written_bytes_not_the_inflated_transfer_count():
    seen = []
    bar_class = _progress_bar_class(lambda done, total: seen.append((done, total)))
    transfer = bar_class(total=0, unit="B", desc="Downloading bytes")
    written = bar_class(total=1000, unit="B", desc="Reconstructing")
    files = bar_class(total=3, desc="Fetching 3 files")
    transfer.update(300)
    files.update(1)
    assert seen == [(0, 1000)] and transfer.n == 300 and files.n == 1
    for bar in (transfer, written, files):
        bar.close()


def test_dtype_and_device_choices():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == "fp32"
    assert resolve_dtype("bfloat16", cpu) == "bf16"
    with pytest.raises(InvalidOptionError, match="dtype 'int3' is not supported"):
        resolve_dtype("int3", cpu)
    assert resolve_device("auto", "cpu") == cpu
    with pytest.raises(DeviceUnavailableError, match="not understood"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_memory_snapshot_matches_the_schema():
    devices = memory_snapshot()
    for device in devices:
        check("DeviceMemory", device, "DeviceMemory")
    if not torch.cuda.is_initialized():
        [cpu] = devices
        assert cpu["kind"] == "cpu" and 0 < cpu["used"] <= cpu["peak"] <= cpu["total"]


def test_the_engine_imports_without_pyzmq():
    # GPU hosts may have no pyzmq: block it and import the engine in a fresh interpreter.
    # Every module under engine/ (the paged engine, quantization and training included), and a benchmark.
    code = ("import sys, pkgutil, importlib; sys.modules['zmq'] = None; import qwenbook_bridge.engine as e; "
            "names = [m.name for m in pkgutil.walk_packages(e.__path__, 'qwenbook_bridge.engine.')]; "
            "[importlib.import_module(n) for n in names]; import qwenbook_bridge.bench.local; "
            "assert len(names) > 40, names")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
