"""The CPU chat benchmark (bench/cpu.py) on the tiny model: every row runs (fp32, int8, int4 on the PyTorch chat engine
and on the llama.cpp one, node-llama-cpp on the q8_0 export), each with the thread count asked for, on the same
prompt ids."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qwenbook_bridge.bench import cpu as bench_cpu


def test_cpu_benchmark_runs_every_row_on_the_same_prompt_with_its_threads(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cpu.json"
    # The int8/int4 rows decode on the dense path: compiling the fused few-row kernels (Inductor, C++) took ~45 s of
    # CPU in the rows' process with an empty compile cache, about two thirds of this test, and the kernels have
    # their own test (test_quant.py::test_cpu_paths_compute_the_dequantized_product_and_share_one_buffer). The
    # rows' process inherits this.
    monkeypatch.setenv("QWENBOOK_CPU_QUANT_KERNEL", "0")
    # 2 threads where the environment says 1 (OMP_NUM_THREADS=1 in the test runner): the row's own setting must win.
    ours = lambda: {k: v for k, v in os.environ.items() if k.startswith("QWENBOOK_")}  # noqa: E731
    env_before = ours()
    assert bench_cpu.main(["--small", "--tokenizer", str(tiny_model_dir), "--threads", "2", "--profile",
                           "--out", str(out)]) == 0
    # The rows' own settings stay in their processes: the test session's environment is as it was.
    assert ours() == env_before
    report = json.loads(out.read_text())
    assert report["errors"] == []
    rows = report["rows"]
    assert [(r["threads"], r["path"]) for r in rows] == [
        (2, "qwenbook fp32"), (2, "qwenbook int8"), (2, "qwenbook int4"), (2, "qwenbook fp32 llama.cpp"),
        (2, "qwenbook int8 llama.cpp"), (2, "qwenbook int4 llama.cpp"), (2, "llama.cpp q8_0")]
    prompt = rows[0]["prompt_ids"]
    assert len(prompt) == report["meta"]["prompt_tokens"] > 20  # the chat template's system turn and the question
    for r in rows:
        assert r["prompt_ids"] == prompt, r["path"]
        assert r["completion_tokens"] == [8], r["path"]
        assert r["decode_tokens_per_s"] > 0 and r["ttft_ms"] > 0 and r["weight_bytes"] > 0, r["path"]
    torch_rows, engine_rows, llama = rows[:3], rows[3:6], rows[6]
    # The worker's paths: each chat engine takes the tiny model at every weight type, and no run found its prompt
    # in the prefix cache (each first token paid the whole prefill).
    assert all(r["loop"] == "chat engine" and r["prefix_hit_tokens"] == 0 for r in torch_rows)
    assert all(r["loop"] == "llama.cpp engine" and r["prefix_hit_tokens"] == 0 for r in engine_rows)
    assert all(r["torch_threads"] == 2 for r in torch_rows + engine_rows)
    # The llama.cpp engine's copies are the worker's default types, each read as its GGUF file.
    sizes = [r["weight_bytes"] for r in engine_rows]
    assert sizes[0] == sizes[1] > sizes[2]  # q8_0 for fp32 and int8 weights, q4_0 for int4
    assert llama["llama_threads"] == 2 and llama["loop"].startswith("node-llama-cpp ")
    assert report["meta"]["gguf"]["gguf_bytes"] == llama["weight_bytes"]
    # One prefill profiled per weight type: its ops by self time, most first; fp32's time goes to dense matmuls.
    profiles = {p["weights"]: p for p in report["profiles"]}
    assert sorted(profiles) == ["fp32", "int4", "int8"]
    for p in profiles.values():
        assert p["forward_ms"] > 0 and p["prompt_tokens"] == len(prompt)
        times = [o["self_ms"] for o in p["top_ops"]]
        assert times and times == sorted(times, reverse=True) and 0 < sum(o["share"] for o in p["top_ops"]) <= 1.001
    assert {"aten::mm", "aten::addmm"} & {o["op"] for o in profiles["fp32"]["top_ops"]}
    table = capsys.readouterr().out
    for r in rows:
        assert r["path"] in table


def test_thread_counts_read_all_as_the_cores_and_drop_repeats() -> None:
    cores = bench_cpu.all_cores()
    assert bench_cpu.thread_counts("1,all,1") == ([1] if cores == 1 else [1, cores])
    with pytest.raises(ValueError):
        bench_cpu.thread_counts("0")


def test_cpu_benchmark_refuses_unknown_weights() -> None:
    with pytest.raises(SystemExit):
        bench_cpu.main(["--small", "--weights", "int3"])
