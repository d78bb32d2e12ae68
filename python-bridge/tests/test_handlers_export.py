"""save / export requests through a real worker (and, where a race or a full disk must be staged, in-process).

One worker is shared by the tests of this file; each writes into its own tmp_path.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from qwenbook_bridge.engine import SamplingParams
from qwenbook_bridge.engine.generate.generation import generate
from qwenbook_bridge.engine.export.gguf_read import GgufFile
from qwenbook_bridge.handlers.dispatch import Handlers
from qwenbook_bridge.handlers.context import JobContext
from qwenbook_bridge.protocol import make_message, validate_message

CHAT = [{"role": "user", "content": "你好，你是谁？"}]
TEXT = "The harbour town woke slowly. 你好，你是谁？ def f(x): return x * 2"


@pytest.fixture(scope="module")
def hf_base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def logits(model, tokenizer, text: str = TEXT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def make_adapter(base, folder: Path, seed: int, targets: list[str]) -> Path:
    """A peft adapter with random, non-zero lora_B (a fresh LoRA is a no-op and would prove nothing)."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                                        init_lora_weights=False))
    pm.save_pretrained(folder)
    return folder


def error(reply) -> tuple[str, str]:
    assert reply.content["status"] == "error", reply.content
    return reply.content["ename"], reply.content["evalue"]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_save_writes_shards_and_index_that_plain_transformers_reloads(client, model_id, hf_base, tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reply, events = client.call("save", {"model_id": model_id, "target": str(tmp_path / "out"), "shard_size": "200KB"})
    content = reply.content
    assert content["status"] == "ok" and content["format"] == "safetensors" and content["path"] == str(tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == content["details"]["shards"] >= 3
    files = {f["path"]: f["bytes"] for f in content["sizes"]["files"]}
    assert {*shards, "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert content["sizes"]["total_bytes"] == sum(files.values()) and "quality" not in content

    stages = [e.content["stage"] for e in events]
    assert {e.msg_type for e in events} == {"export_progress"} and stages[0] == "prepare" and stages[-1] == "done"
    fractions = [e.content["fraction"] for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert torch.equal(logits(saved, tok), logits(hf_base, tok))
    reply, _ = client.call("generate", {"model_id": model_id, "messages": CHAT, "max_tokens": 12, "greedy": True})
    assert reply.content["token_ids"] == generate(tiny, CHAT, SamplingParams(max_tokens=12, greedy=True)).token_ids
    assert leftovers(tmp_path) == ["out"]


def test_merging_adapter_folders_equals_base_plus_adapters_and_leaves_the_model_alone(client, model_id, hf_base, tiny,
                                                                                     tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    a = make_adapter(hf_base, tmp_path / "a", seed=1, targets=["q_proj", "v_proj", "down_proj"])
    b = make_adapter(hf_base, tmp_path / "b", seed=2, targets=["o_proj", "up_proj"])
    tok = tiny.tokenizer
    reply, _ = client.call("save", {"model_id": model_id, "target": str(tmp_path / "one"), "adapters": [str(a)]})
    assert reply.content["details"]["merged"] is True and reply.content["details"]["adapters"] == [str(a)]
    reply, _ = client.call("save", {"model_id": model_id, "target": str(tmp_path / "two"),
                                    "adapters": [str(a), str(b)], "shard_size": "1MB"})
    assert reply.content["status"] == "ok", reply.content

    with_a = PeftModel.from_pretrained(hf_base, str(a), adapter_name="a")
    try:
        expected_one = logits(with_a, tok)
        with_a.load_adapter(str(b), adapter_name="b")
        with_a.base_model.set_adapter(["a", "b"])
        expected_two = logits(with_a, tok)
    finally:
        with_a.unload()
    assert (expected_one - logits(hf_base, tok)).abs().max() > 0.1, "the adapter must change the output"
    for folder, expected in (("one", expected_one), ("two", expected_two)):
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / folder, dtype=torch.float32).eval()
        assert (logits(merged, tok) - expected).abs().max() < 1e-4

    # The resident model answers as before: the adapters were attached for the save only.
    reply, _ = client.call("generate", {"model_id": model_id, "messages": CHAT, "max_tokens": 12, "greedy": True})
    assert reply.content["token_ids"] == generate(tiny, CHAT, SamplingParams(max_tokens=12, greedy=True)).token_ids


def test_export_gguf_reports_size_and_weight_rounding(client, model_id, hf_base, tmp_path):
    target = tmp_path / "tiny-q8_0.gguf"
    reply, events = client.call("export", {"model_id": model_id, "target": str(target), "format": "gguf",
                                           "type": "q8_0"})
    content = reply.content
    assert content["format"] == "gguf-q8_0" and content["sizes"]["files"] == [
        {"path": "tiny-q8_0.gguf", "bytes": target.stat().st_size}]
    q = content["quality"]
    assert 0 < q["mean_kl"] < 0.5 and 0.5 < q["top1_agreement"] <= 1 and q["reference_perplexity"] > 1
    assert "write" in {e.content["stage"] for e in events}
    # The Ollama Modelfile comes with it unless turned off.
    assert content["details"]["modelfile"]["path"] == "tiny-q8_0.Modelfile"
    assert (tmp_path / "tiny-q8_0.Modelfile").read_text().startswith("FROM ./tiny-q8_0.gguf\n")
    with GgufFile(target) as f:
        assert f.metadata["general.architecture"] == "qwen2" and f.metadata["general.name"] == "tiny-qwen2"
        w = hf_base.model.layers[0].self_attn.q_proj.weight
        assert (f.dequantize("blk.0.attn_q.weight") - w).abs().max() < w.abs().max() / 100  # q8_0: 1/127 of a block max


def test_quantized_load_save_and_reload(client, tiny_model_dir, tmp_path):
    reply, events = client.call("load", {"model": str(tiny_model_dir), "dtype": "fp32",
                                         "quant": {"method": "int4", "group_size": 64}})
    info = reply.content["model"]
    assert info["model_id"].endswith(":int4") and "quantize" in [e.content["stage"] for e in events]
    quant = info["quant"]
    assert (quant["method"], quant["group_size"], quant["from_folder"], quant["layers"]) == ("int4", 64, False, 14)
    assert quant["quantized_bytes"] < quant["bf16_bytes"] / 3
    assert quant["quality"]["mean_kl"] > 0 and quant["quality"]["tokens"] > 100

    reply, _ = client.call("save", {"model_id": info["model_id"], "target": str(tmp_path / "int4")})
    saved = reply.content
    assert saved["format"] == "safetensors-int4" and (tmp_path / "int4" / "qwenbook-quant.json").is_file()
    # The codes are the resident ones, so the load-time comparison carries over.
    assert saved["quality"]["mean_kl"] == quant["quality"]["mean_kl"]

    reply, _ = client.call("load", {"model": str(tmp_path / "int4")})
    again = reply.content["model"]
    assert again["model_id"] == "int4:fp32:cpu:int4" and again["quant"]["from_folder"] is True
    replies = [client.call("generate", {"model_id": m, "messages": CHAT, "max_tokens": 12, "greedy": True})[0]
               for m in (info["model_id"], again["model_id"])]
    assert replies[0].content["token_ids"] == replies[1].content["token_ids"]

    reply, _ = client.call("export", {"model_id": again["model_id"], "target": str(tmp_path / "int4.gguf"),
                                      "format": "gguf", "type": "q8_0", "modelfile": False})
    assert reply.content["details"]["dequantized"] is True and "quality" not in reply.content
    assert "modelfile" not in reply.content["details"]
    (tmp_path / "int4.gguf").unlink()

    # int8 from a folder loaded as int4 would need the unquantized weights, which that folder does not have.
    ename, evalue = error(client.call("save", {"model_id": again["model_id"], "target": str(tmp_path / "i8"),
                                               "quant": {"method": "int8"}})[0])
    assert ename == "InvalidOptionError" and "no unquantized weights" in evalue
    assert client.call("unload", {"model_id": again["model_id"]})[0].content["unloaded"] is True
    assert client.call("unload", {"model_id": info["model_id"]})[0].content["unloaded"] is True
    assert leftovers(tmp_path) == ["int4"]


def test_bad_requests_get_readable_errors_and_write_nothing(client, model_id, tiny_model_dir, tmp_path):
    def save(**content):
        return error(client.call("save", {"model_id": model_id, **content})[0])

    assert save(target="out/merged")[0] == "InvalidOptionError"
    assert "absolute path" in save(target="out/merged")[1]
    assert "adapters[0] must be an absolute path" in save(target=str(tmp_path / "x"), adapters=["runs/a"])[1]
    assert "does not exist" in save(target=str(tmp_path / "x"), adapters=[str(tmp_path / "none")])[1]
    assert "no adapter_config.json (it is a full model folder" in save(target=str(tmp_path / "x"),
                                                                       adapters=[str(tiny_model_dir)])[1]
    assert save(target=str(tmp_path / "x"), adapters=[])[0] == "InvalidRequest"  # merge with no adapter
    assert "calibration must be an absolute path" in save(
        target=str(tmp_path / "x"), quant={"method": "int4", "calibration": "calib.json"})[1]
    assert "nf4 (bitsandbytes) weights cannot be saved" in save(target=str(tmp_path / "x"), quant={"method": "nf4"})[1]

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("precious")
    ename, evalue = save(target=str(kept))
    assert ename == "TargetExistsError" and "pass { overwrite: true }" in evalue
    assert leftovers(kept) == ["notes.txt"] and (kept / "notes.txt").read_text() == "precious"

    if importlib.util.find_spec("bitsandbytes") is None:
        ename, evalue = error(client.call("load", {"model": str(tiny_model_dir), "quant": {"method": "nf4"}})[0])
        assert ename == "QuantBackendMissing" and "pip install bitsandbytes" in evalue
    ename, evalue = error(client.call("export", {"model_id": "nope", "target": str(tmp_path / "m.gguf"),
                                                 "format": "gguf"})[0])
    assert ename == "ModelNotLoadedError"
    assert leftovers(tmp_path) == ["kept"]


def test_gguf_export_of_another_architecture_is_refused(client, tiny_model_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    llama = client.call("load", {"model": str(folder), "dtype": "fp32"})[0].content["model"]["model_id"]
    ename, evalue = error(client.call("export", {"model_id": llama, "target": str(tmp_path / "llama.gguf"),
                                                 "format": "gguf"})[0])
    assert ename == "UnsupportedArchitectureError" and "LlamaForCausalLM" in evalue and "Qwen2ForCausalLM" in evalue
    assert client.call("unload", {"model_id": llama})[0].content["unloaded"] is True
    assert leftovers(tmp_path) == ["tiny-llama"]


def test_a_save_cancelled_while_queued_writes_nothing(client, model_id, tmp_path):
    busy = client.send("generate", {"model_id": model_id, "messages": CHAT, "max_tokens": 3000, "greedy": True})
    save = client.send("save", {"model_id": model_id, "target": str(tmp_path / "never")})
    for target in (save, busy):
        client.send("cancel", {"target": target.msg_id})
    replies = {}
    while len(replies) < 2:
        msg = client.recv()
        if msg.msg_type.endswith("_reply") and msg.msg_type != "cancel_reply":
            replies[msg.msg_type] = msg.content
    assert replies["generate_reply"]["finish_reason"] == "cancelled"
    saved = replies["save_reply"]
    assert saved["ename"] == "CancelledError" and "nothing was written" in saved["evalue"]
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- in-process: staged races and a full disk


@pytest.fixture(scope="module")
def handlers(tiny_model_dir):
    h = Handlers("cpu")
    msg = make_message("load", {"model": str(tiny_model_dir), "dtype": "fp32"}, "s")
    reply = h.load(JobContext(msg, threading.Event(), lambda *_: None))
    return h, reply["model"]["model_id"]


def run_job(handlers, kind: str, content: dict, cancel_after_first_tensor: bool = False
            ) -> tuple[Exception | None, list]:
    h, _ = handlers
    msg = make_message(kind, content, "s")
    cancel = threading.Event()
    events = []

    def emit(event_type: str, event: dict) -> None:
        validate_message(make_message(event_type, event, "s", parent=msg))
        events.append(event)
        if cancel_after_first_tensor and event["stage"] == "write" and event["bytes_done"] > 0:
            cancel.set()  # as if the cancel request arrived while the second tensor was being written

    try:
        reply = h.jobs()[kind](JobContext(msg, cancel, emit))
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e, events
    validate_message(make_message(f"{kind}_reply", reply, "s", parent=msg))
    return None, events


@pytest.mark.parametrize("kind,target", [("save", "merged"), ("export", "model.gguf")])
def test_a_cancel_between_tensors_leaves_nothing_behind(handlers, tmp_path, kind, target):
    content = {"model_id": handlers[1], "target": str(tmp_path / target), "shard_size": "100KB"}
    if kind == "export":
        content = {**content, "format": "gguf", "type": "f16"}
        del content["shard_size"]
    err, events = run_job(handlers, kind, content, cancel_after_first_tensor=True)
    assert type(err).__name__ == "CancelledError" and "nothing was written" in str(err)
    assert [e["stage"] for e in events].count("write") == 2  # started, first tensor; stopped after the second
    assert leftovers(tmp_path) == []


def test_not_enough_disk_space_is_refused_before_writing(handlers, tmp_path, monkeypatch):
    import qwenbook_bridge.engine.files.atomic_write as atomic_write

    class Usage:
        total, used, free = 10**12, 10**12 - 10**6, 10**6

    monkeypatch.setattr(atomic_write.shutil, "disk_usage", lambda _p: Usage)
    for kind, content in (("save", {"target": str(tmp_path / "merged")}),
                          ("export", {"target": str(tmp_path / "m.gguf"), "format": "gguf"})):
        err, _ = run_job(handlers, kind, {"model_id": handlers[1], **content})
        assert type(err).__name__ == "InsufficientDiskSpaceError"
        assert "only 1.00 MB is free" in str(err) and "Free some space" in str(err)
    assert leftovers(tmp_path) == []
