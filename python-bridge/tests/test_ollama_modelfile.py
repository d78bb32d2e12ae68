"""The Ollama Modelfile written beside a GGUF export: its TEMPLATE, rendered by Go's own text/template over
Ollama's data shape (tests/ollama/render-template.go), gives the prompt transformers' chat template gives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qwenbook_bridge.engine.export.modelfile import modelfile_text, ollama_template

REPO_ROOT = Path(__file__).resolve().parents[2]
RENDER = REPO_ROOT / "tests" / "ollama" / "render-template.go"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                          "parameters": {"type": "object", "properties": {}}}}


def call(name: str, **arguments: object) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# (name, messages, tools): each ends in a user or tool message, so both sides add the assistant prompt.
CONVERSATIONS = [
    ("one user message", [{"role": "user", "content": "Hello!"}], None),
    ("system and several turns", [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr, hello."},
        {"role": "user", "content": "Where is the treasure?\nTell me."}], None),
    ("several turns, no system", [
        {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 2+2?"}], None),
    ("tools, calls and results", [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and the time?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Paris"), call("get_time")]},
        {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "14:02"},
        {"role": "assistant", "content": "21 degrees at 14:02."},
        {"role": "user", "content": "And Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [call("get_weather", city="Rome")]},
        {"role": "tool", "content": "{\"temp\": 25}"}], [WEATHER, CLOCK]),
    ("tools without a system prompt", [{"role": "user", "content": "Weather in Oslo?"}], [WEATHER]),
]


def normalize(text: str) -> str:
    """JSON lines (tool signatures, tool calls) compared by value: Ollama prints them compact (Go's
    json.Marshal), transformers with ", " and ": " separators; the tokens differ only in spaces there."""
    out = []
    for line in text.split("\n"):
        try:
            out.append(json.dumps(json.loads(line), sort_keys=True) if line.startswith("{") else line)
        except json.JSONDecodeError:
            out.append(line)
    return "\n".join(out)


@pytest.fixture(scope="module")
def renderer(tmp_path_factory) -> Path:
    """The Go renderer, built once (`go run` would link it again for every conversation)."""
    go = shutil.which("go")
    assert go, "Go (Debian's golang-go) is needed to render Ollama templates: run `node kernel/scripts/setup.mjs " \
               "--browser`, which installs it"
    out = tmp_path_factory.mktemp("ollama-render")
    env = {**os.environ, "GOCACHE": os.environ.get("GOCACHE", str(out / "go-cache")), "GOFLAGS": ""}
    done = subprocess.run([go, "build", "-o", str(out / "render"), str(RENDER)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "render"


def render_go(renderer: Path, template: str, tmp_path: Path, **spec: object) -> str:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"template": template, **spec}))
    done = subprocess.run([str(renderer), str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def ollama_messages(messages: list[dict]) -> list[dict]:
    """transformers' message dicts in Ollama's shape: reasoning as `thinking`, calls without the type."""
    out = []
    for m in messages:
        o = {"role": m["role"], "content": m["content"]}
        if m.get("reasoning_content"):
            o["thinking"] = m["reasoning_content"]
        if m.get("tool_calls"):
            o["tool_calls"] = [{"function": c["function"]} for c in m["tool_calls"]]
        out.append(o)
    return out


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir: Path, tiny_qwen3_dir: Path):
    from transformers import AutoTokenizer

    return {"qwen2.5": AutoTokenizer.from_pretrained(tiny_model_dir),
            "qwen3": AutoTokenizer.from_pretrained(tiny_qwen3_dir)}


@pytest.mark.parametrize("fmt", ["qwen2.5", "qwen3"])
@pytest.mark.parametrize("name,messages,tools", CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS])
def test_template_renders_like_the_chat_template(tokenizers, renderer, fmt: str, name: str, messages: list, tools,
                                                 tmp_path: Path) -> None:
    tok = tokenizers[fmt]
    template, got_fmt = ollama_template(tok)
    assert got_fmt == fmt and template is not None
    expected = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    rendered = render_go(renderer, template, tmp_path, messages=ollama_messages(messages), tools=tools or [])
    assert normalize(rendered) == normalize(expected)


def test_qwen3_thinking(tokenizers, renderer, tmp_path: Path) -> None:
    """Reasoning shows in the assistant turn after the last user message (a tool-calling turn), not in earlier
    turns; Ollama's `think: false` gives enable_thinking=False's empty think block."""
    tok = tokenizers["qwen3"]
    template, _ = ollama_template(tok)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Call the tool.",
         "tool_calls": [call("get_weather", city="Paris")]},
        {"role": "tool", "content": "sunny"}]
    expected = tok.apply_chat_template(messages, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert "Call the tool." in expected and "Greet back." not in expected
    rendered = render_go(renderer, template, tmp_path, messages=ollama_messages(messages), tools=[WEATHER])
    assert normalize(rendered) == normalize(expected)
    short = [{"role": "user", "content": "Hi"}]
    for think in (False, True):
        expected = tok.apply_chat_template(short, tokenize=False, add_generation_prompt=True,
                                           enable_thinking=think)
        assert render_go(renderer, template, tmp_path, messages=short, think=think) == expected
    assert expected.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("fmt", ["qwen2.5", "qwen3"])
def test_completion_path_with_prompt(tokenizers, renderer, fmt: str, tmp_path: Path) -> None:
    """Ollama's older /api/generate path (.System and .Prompt, no .Messages) gives the same prompt."""
    tok = tokenizers[fmt]
    template, _ = ollama_template(tok)
    for system in ("", "Answer in French."):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi"}]
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_go(renderer, template, tmp_path, prompt="Hi", system=system) == expected


def test_modelfile_parameters_and_stops(tokenizers) -> None:
    from transformers import GenerationConfig

    gen = GenerationConfig(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
                           eos_token_id=[151645, 151643])
    text, info = modelfile_text("model.gguf", tokenizers["qwen2.5"], gen)
    lines = text.splitlines()
    assert lines[0] == "FROM ./model.gguf" and lines[1].startswith('TEMPLATE """')
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "<|endoftext|>"' in lines
    assert 'PARAMETER stop "<|im_start|>"' in lines
    for line in ("PARAMETER temperature 0.7", "PARAMETER top_p 0.8", "PARAMETER top_k 20",
                 "PARAMETER repeat_penalty 1.05"):
        assert line in lines
    assert info["template"] == "qwen2.5" and info["parameters"]["top_k"] == 20
    # Defaults transformers fills in are not written: Ollama's own defaults stay.
    _, bare = modelfile_text("model.gguf", tokenizers["qwen2.5"], GenerationConfig(eos_token_id=151645))
    assert bare["parameters"] == {}


def test_export_writes_the_modelfile_beside_the_gguf(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwenbook_bridge.engine.export.gguf import GgufConfig, export_gguf
    from qwenbook_bridge.engine.files.save import TargetExistsError

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    report = export_gguf(model, tok, tmp_path / "tiny.gguf", GgufConfig(type="q8_0", modelfile=True), evaluate=False)
    text = (tmp_path / "tiny.Modelfile").read_text()
    assert text.startswith('FROM ./tiny.gguf\nTEMPLATE """{{- if .Messages }}<|im_start|>system\n')
    assert "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." in text
    assert report.details["modelfile"]["path"] == "tiny.Modelfile"
    assert report.details["modelfile"]["stop"] == ["<|im_end|>", "<|endoftext|>", "<|im_start|>"]
    # A Modelfile already there is not replaced silently, and nothing else is written.
    (tmp_path / "tiny.gguf").rename(tmp_path / "kept.gguf")
    with pytest.raises(TargetExistsError, match="tiny.Modelfile already exists"):
        export_gguf(model, tok, tmp_path / "tiny.gguf", GgufConfig(type="q8_0", modelfile=True), evaluate=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.gguf", "tiny.Modelfile"]
    export_gguf(model, tok, tmp_path / "tiny.gguf", GgufConfig(type="q8_0", modelfile=False), evaluate=False)
    assert (tmp_path / "tiny.Modelfile").read_text() == text
