"""The chat benchmark (bench/chat.py) on the tiny model: both loops time the same reply, quantized too."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qwenbook_bridge.bench import chat as bench_chat


def test_chat_benchmark_times_both_loops_and_finds_the_same_reply(tiny_model_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The int8 rows decode on the dense path: compiling the fused few-row CPU kernel (Inductor, C++) was ~7 s of CPU
    # with a warm compile cache and more with an empty one, and that kernel has its own test
    # (test_quant.py::test_cpu_paths_compute_the_dequantized_product_and_share_one_buffer).
    monkeypatch.setenv("QWENBOOK_CPU_QUANT_KERNEL", "0")
    before = os.environ.get("QWENBOOK_FAST_DECODE")
    out = tmp_path / "chat.json"
    assert bench_chat.main(["--model", str(tiny_model_dir), "--max-tokens", "12", "--runs", "1", "--quant", "int8",
                            "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["quant"], r["loop"]) for r in rows] == [("none", "plain"), ("none", "fast"), ("int8", "plain"),
                                                       ("int8", "fast")]
    assert all(r["tokens_per_s"] > 0 and r["completion_tokens"] == 12 for r in rows)
    assert [r["first_divergence_from_plain"] for r in rows if r["loop"] == "fast"] == [None, None]
    assert os.environ.get("QWENBOOK_FAST_DECODE") == before  # the benchmark puts the switch back


def test_chat_benchmark_needs_a_model_or_a_tokenizer() -> None:
    with pytest.raises(SystemExit):
        bench_chat.main([])
