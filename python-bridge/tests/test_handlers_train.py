"""train / train_preview / adapter_* requests through a real worker, plus the out-of-memory path in-process.

One worker serves the whole file (the tiny model in fp32, and a bf16 copy as "another model"); every message
it sends is checked against the schema by the wire client.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qwenbook_bridge.handlers.dispatch import Handlers
from qwenbook_bridge.handlers.context import JobContext
from qwenbook_bridge.protocol import Message, exception_content, make_message, validate_message
from wire import Client

ROWS = [{"system": "简短", "instruction": f"问题{i}", "output": f"回答{i}号"} for i in range(12)]
CHAT = [{"role": "user", "content": "问题3"}]
SMALL = {"max_length": 48, "batch_size": 2, "grad_accum": 1, "epochs": 1, "lr": 1e-3, "lora": {"r": 4},
         "log_every": 1}


def train_request(model_id: str, out: Path, rows=ROWS, **options) -> dict:
    config = {"output_dir": str(out), **copy.deepcopy(SMALL), **options}
    return {"model_id": model_id, "config": config, "datasets": [{"rows": rows}]}


def greedy(client: Client, model_id: str, adapter: str | None = None, max_tokens: int = 8) -> list[int]:
    content = {"model_id": model_id, "messages": CHAT, "greedy": True, "max_tokens": max_tokens, "stream": False}
    if adapter is not None:
        content["adapter"] = adapter
    reply, _ = client.call("generate", content)
    assert reply.content["status"] == "ok", reply.content
    return reply.content["token_ids"]


def wait_for(client: Client, pending: dict[str, str], done: Callable[[list[Message]], bool]) -> list[Message]:
    """Receive messages for several requests in flight (by msg_id -> type) until `done(seen)` holds."""
    seen: list[Message] = []
    while not done(seen):
        msg = client.recv()
        assert msg.parent_header["msg_id"] in pending, f"unexpected {msg.msg_type}"
        seen.append(msg)
    return seen


def reply_of(seen: list[Message], request: Message) -> Message | None:
    return next((m for m in seen if m.msg_type == f"{request.msg_type}_reply"
                 and m.parent_header["msg_id"] == request.msg_id), None)


def test_train_streams_events_and_replies_with_a_loadable_adapter(client, model_id, tmp_path):
    base = greedy(client, model_id)
    out = tmp_path / "run"
    reply, events = client.call("train", train_request(model_id, out, eval_split=0.2, eval_every=2, save_every=3))
    result = reply.content
    assert result["status"] == "ok" and result["outcome"] == "completed", result
    kinds = [e.msg_type for e in events]
    assert kinds[0] == "train_begin" and kinds.count("train_progress") == result["total_steps"] == 5
    begin = events[0].content
    assert begin["examples"] == 10 and begin["eval_examples"] == 2 and begin["config"]["output_dir"] == str(out)
    progress = [e.content for e in events if e.msg_type == "train_progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4, 5]
    assert [e.content["step"] for e in events if e.msg_type == "eval"] == [2, 4, 5]
    assert [(e.content["step"], e.content["reason"]) for e in events if e.msg_type == "checkpoint"] == [
        (3, "periodic"), (5, "final")]
    assert result["adapter_path"] == str(out) and (out / "adapter_config.json").is_file()
    assert result["final_loss"] == progress[-1]["loss"] and result["tokens_per_s"] > 0
    assert [h["step"] for h in result["history"] if h["kind"] == "train_progress"] == [1, 2, 3, 4, 5]
    # The base model answers exactly as before: training gave it back unchanged.
    assert greedy(client, model_id) == base


def test_adapters_switch_per_request_and_match_plain_peft(client, model_id, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = greedy(client, model_id, max_tokens=12)
    out = tmp_path / "huanhuan"
    reply, _ = client.call("train", train_request(model_id, out, lr=2e-2, epochs=4))
    assert reply.content["outcome"] == "completed"

    loaded, _ = client.call("adapter_load", {"model_id": model_id, "path": str(out)})
    info = loaded.content["adapter"]
    assert info["name"] == "huanhuan" and info["path"] == str(out) and info["r"] == 4 and len(info["targets"]) == 7
    assert loaded.content["reloaded"] is False and [a["name"] for a in loaded.content["adapters"]] == ["huanhuan"]
    tuned = greedy(client, model_id, "huanhuan", max_tokens=12)
    assert tuned != base
    # No adapter named: the base answers, with the adapter still loaded.
    assert greedy(client, model_id, max_tokens=12) == base

    # Plain peft on a fresh copy of the base gives the same greedy tokens as the worker's adapter.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), str(out))
    enc = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = hf.eval().generate(**enc, max_new_tokens=12, do_sample=False)
    assert generated[0, enc["input_ids"].shape[1]:].tolist()[:len(tuned)] == tuned

    again, _ = client.call("adapter_load", {"model_id": model_id, "path": str(out)})
    assert again.content["reloaded"] is False  # same folder, same weights: nothing to do
    listed, _ = client.call("adapter_list", {"model_id": model_id})
    assert [a["name"] for a in listed.content["adapters"]] == ["huanhuan"]
    gone, _ = client.call("adapter_unload", {"model_id": model_id, "name": "huanhuan"})
    assert gone.content == {"status": "ok", "unloaded": True, "adapters": []}
    missing, _ = client.call("generate", {"model_id": model_id, "messages": CHAT, "adapter": "huanhuan"})
    assert missing.content["ename"] == "AdapterError" and "no adapter named 'huanhuan'" in missing.content["evalue"]
    assert greedy(client, model_id, max_tokens=12) == base


def test_preview_marks_exactly_the_answers_as_trained(client, model_id):
    rows = [{"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好呀"},
                               {"from": "human", "value": "再见"}, {"from": "gpt", "value": "再见啦"}]}]
    reply, _ = client.call("train_preview", {"model_id": model_id, "datasets": [{"rows": rows, "format": "sharegpt"}],
                                             "n": 3})
    [example] = reply.content["examples"]
    trained = [s["text"] for s in example["segments"] if s["trained"]]
    assert trained == ["你好呀<|im_end|>", "再见啦<|im_end|>"]
    assert "".join(s["text"] for s in example["segments"]).startswith("<|im_start|>system\n")
    assert example["row"] == 1 and example["truncated"] is False


@pytest.mark.parametrize("change,ename,words", [
    (lambda d, tmp: d["datasets"][0].update(rows=None, path=str(tmp / "missing.json")), "DatasetError",
     ["missing.json", "file not found"]),
    (lambda d, tmp: d["datasets"][0].update(rows=None, path=str(write(tmp / "bad.jsonl", '{"instruction": "a", '
                                                                      '"output": "b"}\n{oops}\n'))),
     "DatasetError", ["bad.jsonl", "row 2", "not valid JSON"]),
    (lambda d, tmp: d["datasets"][0].update(rows=[{"instruction": "a", "output": "b"}, {"instruction": "c"}]),
     "DatasetError", ["row 2", 'field "output"', "is missing"]),
    (lambda d, tmp: d["config"]["lora"].update(targets=["q_proj", "qkv"]), "InvalidOptionError",
     ["unknown LoRA target module(s) ['qkv']", "q_proj", "v_proj", "down_proj"]),
    (lambda d, tmp: d["config"].update(output_dir="runs/relative"), "InvalidOptionError",
     ["config.output_dir must be an absolute path"]),
    (lambda d, tmp: d["config"].update(batch_size=0), "InvalidRequest", ["config.batch_size must be at least 1"]),
    (lambda d, tmp: d["config"].update(eval_split=1.5), "InvalidRequest", ["config.eval_split must be less than 1"]),
    (lambda d, tmp: d["config"].update(eval_every=5), "InvalidOptionError", ["eval_split is 0"]),
])
def test_bad_inputs_fail_before_training_starts(client, model_id, tmp_path, change, ename, words):
    request = train_request(model_id, tmp_path / "bad")
    change(request, tmp_path)
    request["datasets"] = [{k: v for k, v in d.items() if v is not None} for d in request["datasets"]]
    reply, events = client.call("train", request)
    assert events == []  # nothing started
    assert reply.content["ename"] == ename, reply.content
    for w in words:
        assert w in reply.content["evalue"]
    assert not (tmp_path / "bad").exists()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_training_leaves_other_models_free_holds_its_own_and_cancels_into_a_checkpoint(client, model_id, tmp_path,
                                                                                       tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    other, _ = client.call("load", {"model": str(tiny_model_dir), "dtype": "bf16"})
    other_id = other.content["model"]["model_id"]
    assert other_id != model_id
    out = tmp_path / "long"
    train = client.send("train", train_request(model_id, out, max_steps=100_000))
    pending = {train.msg_id: "train"}
    seen = wait_for(client, pending, lambda s: any(m.msg_type == "train_progress" for m in s))

    # A chat on the model being trained waits for the run to end, while a chat on another model and the
    # worker's status are answered as the run goes on.
    chat_same = client.send("generate", {"model_id": model_id, "messages": CHAT, "greedy": True, "max_tokens": 4})
    chat_other = client.send("generate", {"model_id": other_id, "messages": CHAT, "greedy": True, "max_tokens": 4})
    status = client.send("status", {})
    pending.update({chat_other.msg_id: "generate", status.msg_id: "status", chat_same.msg_id: "generate"})
    seen += wait_for(client, pending, lambda s: reply_of(s, chat_other) is not None and reply_of(s, status) is not None)
    assert reply_of(seen, chat_other).content["completion_tokens"] == 4
    running = {r["msg_id"] for r in reply_of(seen, status).content["running"]}
    assert {train.msg_id, chat_same.msg_id} <= running
    assert reply_of(seen, train) is None and reply_of(seen, chat_same) is None
    steps_before_cancel = max(m.content["step"] for m in seen if m.msg_type == "train_progress")

    cancel = client.send("cancel", {"target": train.msg_id})
    pending[cancel.msg_id] = "cancel"
    seen += wait_for(client, pending, lambda s: all(reply_of(s, r) is not None for r in (train, chat_same, cancel)))
    order = [m.parent_header["msg_id"] for m in seen if m.msg_type.endswith("_reply")]
    assert order.index(train.msg_id) < order.index(chat_same.msg_id)
    result = reply_of(seen, train).content
    assert result["outcome"] == "cancelled" and steps_before_cancel <= result["step"] < 100_000
    stopped = Path(result["adapter_path"])
    assert stopped == out / f"checkpoint-{result['step']}"
    assert [(e.content["reason"], e.content["path"]) for e in seen if e.msg_type == "checkpoint"] == [
        ("cancel", str(stopped))]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(stopped))
    state = json.loads((stopped / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] == result["step"]  # the Trainer's shape; run_state.json holds what resume reads
    assert reply_of(seen, chat_same).content["status"] == "ok"
    unloaded, _ = client.call("unload", {"model_id": other_id})
    assert unloaded.content["unloaded"] is True


def test_out_of_memory_ends_the_run_with_a_hint_and_the_base_keeps_working(tiny_model_dir, tmp_path):
    handlers = Handlers("cpu")
    load = make_message("load", {"model": str(tiny_model_dir), "dtype": "fp32"}, "s")
    model_id = handlers.load(JobContext(load, threading.Event(), lambda *_: None))["model"]["model_id"]

    def call(kind: str, content: dict) -> dict:
        msg = make_message(kind, content, "s")
        reply = handlers.jobs()[kind](JobContext(msg, threading.Event(), lambda *_: None))
        validate_message(make_message(f"{kind}_reply", reply, "s", parent=msg))
        return reply

    chat = {"model_id": model_id, "messages": CHAT, "greedy": True, "max_tokens": 6}
    before = call("generate", chat)["token_ids"]
    model = handlers.registry.get(model_id).model
    calls = {"n": 0}

    def explode(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    hook = model.model.layers[0].register_forward_hook(explode)
    try:
        with pytest.raises(Exception) as err:
            call("train", train_request(model_id, tmp_path / "oom", max_steps=5))
    finally:
        hook.remove()
    content = exception_content(err.value)
    assert content["ename"] == "TrainingOutOfMemoryError"
    for hint in ("out of memory", "smaller batch_size (now 2)", "gradient_checkpointing=True", "still loaded"):
        assert hint in content["evalue"]
    assert call("generate", chat)["token_ids"] == before
