"""`python -m qwenbook_bridge.openai.cli MODEL --adapter NAME=DIR` (repeatable; `--adapter DIR` names it after
the folder): adapters served by name beside the base model, through the paged engine's adapter slots."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from qwenbook_bridge.engine.errors import EngineError
from qwenbook_bridge.openai.cli import adapter_option, adapters_from, build_parser


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    out = tmp_path_factory.mktemp("cli") / "my-adapter"
    get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                    init_lora_weights=False)).save_pretrained(out)
    return out


def test_adapter_option_reads_name_equals_dir_or_a_bare_dir(tmp_path):
    assert adapter_option("huanhuan=/data/out/adapter") == ("huanhuan", "/data/out/adapter")
    assert adapter_option("/data/out/adapter/") == ("adapter", "/data/out/adapter/")
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert adapter_option(str(odd)) == ("a=b", str(odd))  # an existing folder is a folder, '=' or not
    for bad, message in (("=/x", "no adapter name"), ("x=", "no adapter folder"), (" x=/y", "no adapter name")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            adapter_option(bad)


def test_vllm_json_form_is_read():
    assert adapter_option('{"name": "hh", "path": "/data/a=b", "base_model_name": "q"}') == ("hh", "/data/a=b")
    for bad, message in (("{nope", "not valid JSON"), ('{"name": "hh"}', 'fields "name" and "path"'),
                         ('{"name": " ", "path": "/x"}', "non-empty name")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            adapter_option(bad)


def test_adapter_is_repeatable_and_a_name_given_twice_is_refused():
    args = build_parser().parse_args(["m", "--adapter", "a=/x", "--adapter", "/y/b"])
    assert adapters_from(args.adapter) == {"a": "/x", "b": "/y/b"}
    # vLLM's --lora-modules takes several at once and adds to the same list.
    args = build_parser().parse_args(["m", "--lora-modules", "c=/z", "d=/w", "--adapter", "a=/x"])
    assert adapters_from(args.adapter) == {"c": "/z", "d": "/w", "a": "/x"}
    assert build_parser().parse_args(["m"]).adapter is None
    with pytest.raises(EngineError, match="names 'a' twice"):
        adapters_from([("a", "/x"), ("a", "/y")])


def test_a_bad_adapter_fails_before_the_model_loads(tmp_path, tiny_model_dir):
    # The CLI's own main, then whether it imported torch: the adapter folder is checked before torch's import.
    run_cli = ("import sys; from qwenbook_bridge.openai.cli import main; code = main(sys.argv[1:]); "
               "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", run_cli, str(tiny_model_dir), "--port", "0", "--device", "cpu",
                          "--adapter", f"x={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "adapter 'x'" in run.stderr and "no adapter_config.json" in run.stderr
    assert "[load]" not in run.stderr and run.stdout.strip() == "no torch"


def test_a_bare_adapter_dir_is_served_under_the_printed_name(tiny, tiny_model_dir, adapter_dir):
    """The README's `serve <model> --adapter <adapter dir>`: the name printed is the adapter's, and asking for it
    gets peft's output with that adapter; the base model is served beside it under its own name."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    messages = [{"role": "user", "content": "Tell me about the moon."}]
    text = tiny.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      str(adapter_dir)).eval()
    with torch.inference_mode():
        ids = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
    ids = next((ids[:i] for i, t in enumerate(ids) if t in tiny.eos_token_ids), ids)
    want = tiny.tokenizer.decode(ids)

    proc = subprocess.Popen([sys.executable, "-m", "qwenbook_bridge.openai.cli", str(tiny_model_dir), "--port", "0",
                             "--device", "cpu", "--dtype", "fp32", "--adapter", str(adapter_dir),
                             "--adapter", f"second={adapter_dir}", "--name", "base"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        # Two adapters: the line names the base model, and the next line lists every id.
        assert line.startswith("Serving base at http://127.0.0.1:"), line + proc.stderr.read()
        assert proc.stdout.readline().strip() == "models: base (base), my-adapter (adapter), second (adapter)"
        url = line.split(" at ")[1].split()[0]
        cards = httpx.get(url + "/models", timeout=30).json()["data"]
        assert [c["id"] for c in cards] == ["base", "my-adapter", "second"]
        assert cards[1]["root"] == str(adapter_dir) and cards[1]["parent"] == "base"
        replies = {}
        for name in ("my-adapter", "second", "base", str(tiny_model_dir)):
            r = httpx.post(url + "/chat/completions", timeout=120,
                           json={"model": name, "messages": messages, "max_tokens": 10, "temperature": 0})
            assert r.status_code == 200, r.text
            replies[name] = r.json()["choices"][0]["message"]["content"]
        assert replies["my-adapter"] == replies["second"] == want
        assert replies["base"] == replies[str(tiny_model_dir)] != want  # the model folder is an alias of the base
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_one_adapter_is_the_name_printed(tiny_model_dir, adapter_dir):
    proc = subprocess.Popen([sys.executable, "-m", "qwenbook_bridge.openai.cli", str(tiny_model_dir), "--port", "0",
                             "--device", "cpu", "--adapter", f"huanhuan={adapter_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("Serving huanhuan at "), line + proc.stderr.read()
        assert proc.stdout.readline().strip() == f"models: {tiny_model_dir.name} (base), huanhuan (adapter)"
        assert '"model": "huanhuan"' in proc.stdout.readline()  # the curl example asks for the adapter
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
