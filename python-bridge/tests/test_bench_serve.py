"""The serving benchmark (tests/bench/serve_bench.py) on the tiny model on the CPU: every level reports its
columns, from real HTTP streams in client processes, beside the static-batch decoder, and again with its clients
spread over LoRA adapters served by name, with the ratio to the base row; and its random LoRA adapters are what
peft loads. No timing is asserted: only that the figures exist and are sane."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "bench" / "serve_bench.py"


def load_script():
    spec = importlib.util.spec_from_file_location("serve_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_bench"] = module
    spec.loader.exec_module(module)
    return module


def test_smoke_run_reports_every_column_per_level(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "serve.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--adapters", "3", "--model", str(tiny_model_dir),
                          "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    assert json.loads(run.stdout.strip().splitlines()[-1]) == result
    meta = result["meta"]
    assert meta["card"].startswith("CPU") and meta["date"] and meta["max_tokens"] == 8
    assert meta["engine"]  # which engine the server ran is on record
    assert 40 <= meta["prompt_words"][0] <= meta["prompt_words"][1] <= 160
    levels = {lv["concurrency"]: lv for lv in result["levels"]}
    assert set(levels) == {1, 4}
    for c, lv in levels.items():
        assert lv["errors"] == 0, lv["error_examples"]
        assert lv["requests"] == c and lv["tokens"] == 8 * c  # ignore_eos: every reply has exactly 8 tokens
        assert lv["tokens_per_s"] > 0 and lv["wall_s"] > 0
        assert 0 < lv["ttft_p50_ms"] <= lv["ttft_p99_ms"]
        assert 0 < lv["itl_p50_ms"] <= lv["itl_p99_ms"]
        assert 1 <= lv["server"]["batch_peak"] <= c  # sampled from the server's own stats while the level ran
        static = lv["static"]
        assert static["batch"] == c and static["tokens_per_s"] > 0 and static["decode_tokens_per_s"] > 0
        assert 0 < static["first_tokens_ms"] < 1000 * static["wall_s"]
    assert levels[4]["prompt_words"][0] < levels[4]["prompt_words"][1]  # the clients' prompts differ in length
    # --adapters 3: three random rank-16 adapters served by name; each level again, its clients round-robin over
    # them, with the ratio to the base row of the same concurrency (1 client: chat through one adapter).
    assert result["adapters"] == {"run": True, "names": ["lora0", "lora1", "lora2"], "rank": 16}
    spread = {lv["concurrency"]: lv for lv in result["adapter_levels"]}
    assert set(spread) == {1, 4}
    assert spread[1]["adapters"] == ["lora0"] and spread[4]["adapters"] == ["lora0", "lora1", "lora2"]
    for c, lv in spread.items():
        assert lv["model"] == "adapters" and levels[c]["model"] == "base"
        assert lv["errors"] == 0, lv["error_examples"]
        assert lv["requests"] == c and lv["tokens"] == 8 * c and lv["static"] is None
        assert lv["ratio_to_base"] == round(lv["tokens_per_s"] / levels[c]["tokens_per_s"], 3) > 0
        assert 1 <= lv["server"]["batch_peak"] <= c
    assert "clients spread round-robin over 3 LoRA adapters (rank 16" in run.stdout
    adapter_table = run.stdout.split("clients spread round-robin")[1].splitlines()
    assert "vs base" in adapter_table[1]
    assert [line.split()[0] for line in adapter_table[3:5]] == ["1", "4"]
    assert all(line.rstrip().endswith("x") for line in adapter_table[3:5])
    header = next(line for line in run.stdout.splitlines() if line.lstrip().startswith("clients"))
    for column in ("tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "err", "batch", "static tok/s"):
        assert column in header


def test_random_adapter_is_a_peft_lora_that_changes_the_output(tmp_path: Path, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    bench = load_script()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = model(ids).logits
    folder = bench.write_random_lora(tmp_path / "lora", model.config, rank=4, seed=1, dtype=torch.float32)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert len(saved) == 2 * 7 * model.config.num_hidden_layers  # A and B of seven projections per layer
    peft_model = PeftModel.from_pretrained(model, str(folder)).eval()
    layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    assert torch.equal(layer.lora_B["default"].weight,
                       saved["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"])
    with torch.no_grad():
        after = peft_model(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("levels, message", [("1,x", "comma list"), ("0,4", "at least 1")])
def test_bad_concurrency_is_refused_with_a_clear_message(levels: str, message: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script()
    with pytest.raises(SystemExit) as exit_info:
        bench.parse(["--concurrency", levels])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_url_mode_measures_a_server_in_another_process(tmp_path: Path, tiny_model_dir: Path) -> None:
    """--url: the headless server (`qwenbook serve`'s Python side) in its own process, with an API key; the
    benchmark reads the base model's name from /v1/models and says that it serves no adapters."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "qwenbook_bridge.openai.cli", str(tiny_model_dir), "--port", "0",
                               "--device", "cpu", "--dtype", "fp32", "--api-key", "sk-bench"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = ""
        while "Serving" not in line:  # the server prints its URL once it accepts requests
            line = server.stdout.readline()
            assert line or server.poll() is None, "the server exited before serving"
        url = line.split(" at ")[1].split()[0]
        out = tmp_path / "url.json"
        run = subprocess.run([sys.executable, str(SCRIPT), "--url", url, "--api-key", "sk-bench", "--concurrency",
                              "1,2", "--max-tokens", "4", "--json", str(out)],
                             capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=60)
    result = json.loads(out.read_text(encoding="utf-8"))
    for lv in result["levels"]:
        assert lv["errors"] == 0, lv["error_examples"]
        assert lv["tokens"] == 4 * lv["concurrency"] and lv["itl_p50_ms"] > 0 and lv["static"] is None
    assert not result["adapters"]["run"] and "/v1/models lists only" in result["adapters"]["reason"]
    assert result["adapter_levels"] == [] and "adapter rows not run: /v1/models lists only" in run.stdout
