"""serve_start with `adapters` (name -> folder) and `memory_utilization` through a real worker started with --root,
driven over ZeroMQ like the kernel drives it: adapters are served by name, their folders are checked like every
client path, and serve_status reports the adapters and the engine's cache."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
import torch

from wire import TIMEOUT_S, Client

CHAT = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("root").resolve()


@pytest.fixture(scope="module")
def worker_args(root) -> list[str]:
    return ["--root", str(root)]


@pytest.fixture(scope="module")
def model_id(client, tiny_model_dir, root):
    """The tiny model, copied inside the worker's root (the worker loads local folders only from there)."""
    inside = root / "tiny-model"
    shutil.copytree(tiny_model_dir, inside)
    return ok(client, "load", {"model": str(inside), "dtype": "fp32"})["model"]["model_id"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, root):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    out = root / "adapters" / "huanhuan"
    get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj", "up_proj"],
                                    init_lora_weights=False)).save_pretrained(out)
    return out


def ok(client: Client, kind: str, content: dict) -> dict:
    reply, _ = client.call(kind, content)
    assert reply.content["status"] == "ok", reply.content
    return reply.content


def error(client: Client, kind: str, content: dict) -> dict:
    reply, _ = client.call(kind, content)
    assert reply.content["status"] == "error", reply.content
    return reply.content


def peft_reply(tiny, tiny_model_dir, adapter_dir, n: int) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      str(adapter_dir)).eval()
    text = tiny.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    prompt = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        ids = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
    ids = next((ids[:i] for i, t in enumerate(ids) if t in tiny.eos_token_ids), ids)
    return tiny.tokenizer.decode(ids)


def test_adapters_are_served_by_name_and_reported(client, model_id, tiny, tiny_model_dir, adapter_dir):
    asked = {"model_id": model_id, "port": 0, "name": "tiny", "adapters": {"huanhuan": str(adapter_dir)},
             "memory_utilization": 0.5}
    server = ok(client, "serve_start", asked)["server"]
    assert server["adapters"] == {"huanhuan": str(adapter_dir)}
    stats = server["stats"]
    assert stats["adapters"] == ["huanhuan"] and stats["memory_utilization"] == 0.5
    assert stats["blocks_total"] > 0 and stats["blocks_used"] == 0 and stats["block_size"] > 0
    assert stats["cache_bytes"] > 0 and stats["prefix_hit_rate"] == 0

    cards = httpx.get(server["url"] + "/models", timeout=TIMEOUT_S).json()["data"]
    assert [c["id"] for c in cards] == ["tiny", "huanhuan"] and cards[1]["parent"] == "tiny"
    replies = {}
    for name in ("huanhuan", "tiny"):
        body = {"model": name, "messages": CHAT, "max_tokens": 10, "temperature": 0}
        answer = httpx.post(server["url"] + "/chat/completions", json=body, timeout=TIMEOUT_S).json()
        assert answer["model"] == name
        replies[name] = answer["choices"][0]["message"]["content"]
    assert replies["huanhuan"] == peft_reply(tiny, tiny_model_dir, adapter_dir, 10) != replies["tiny"]

    status = ok(client, "serve_status", {"model_id": model_id})["servers"][0]["stats"]
    assert status["requests_total"] == 2 and status["adapters"] == ["huanhuan"] and status["blocks_total"] > 0

    assert ok(client, "serve_start", asked)["already_running"] is True
    other = error(client, "serve_start", {**asked, "adapters": {}})
    assert other["ename"] == "ServerConflictError"
    ok(client, "serve_stop", {"model_id": model_id})


def test_adapter_folders_are_checked_like_every_client_path(client, model_id, adapter_dir):
    relative = error(client, "serve_start", {"model_id": model_id, "port": 0, "adapters": {"a": "some/adapter"}})
    assert relative["ename"] == "InvalidOptionError" and "adapters.a must be an absolute path" in relative["evalue"]
    with tempfile.TemporaryDirectory() as outside:
        reply = error(client, "serve_start", {"model_id": model_id, "port": 0, "adapters": {"a": outside}})
    assert reply["ename"] == "PathOutsideRootError" and "outside this worker's root" in reply["evalue"]
    clash = error(client, "serve_start", {"model_id": model_id, "port": 0, "name": "tiny",
                                          "adapters": {"tiny": str(adapter_dir)}})
    assert "already the base model's name" in clash["evalue"]
    missing = error(client, "serve_start", {"model_id": model_id, "port": 0,
                                            "adapters": {"a": str(adapter_dir.parent / "nothing")}})
    assert "adapter 'a'" in missing["evalue"] and "not found" in missing["evalue"]
    bad = error(client, "serve_start", {"model_id": model_id, "port": 0, "memory_utilization": 0})
    assert bad["ename"] == "InvalidRequest" and "memory_utilization" in bad["evalue"]
    assert ok(client, "serve_status", {})["servers"] == []
