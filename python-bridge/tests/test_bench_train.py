"""The training benchmark, small, on the CPU: every path in a process of its own, the paths' order alternated
across repeats, losses compared across the processes, Liger's row saying why it did not run, and the real-data
scenario counting the answer tokens of the tutorial rows each step trained on."""

from __future__ import annotations

import json
import os

from qwenbook_bridge.bench import train as bench_train
from qwenbook_bridge.bench.train_data import DEFAULT_DATA_DIR, real_rows
from qwenbook_bridge.engine.data.chat_encoding import IGNORE_INDEX


def test_the_paths_alternate_across_repeats():
    order = bench_train.plan(["4x384", "real-4x384"], ["hf", "ours"], 2)
    assert [(p, r) for s, p, r in order if s == "4x384"] == [("hf", 0), ("ours", 0), ("ours", 1), ("hf", 1)]
    assert len(order) == 8


def test_small_training_benchmark_runs_each_path_in_its_own_process(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    out = tmp_path / "bench.json"
    code = bench_train.main(["--small", "--device", "cpu", "--configs", "2x32", "--real", "2x64", "--real-rows", "40",
                             "--paths", "hf,ours,liger", "--repeats", "1", "--warmup", "1", "--steps", "2",
                             "--no-fp32-reference", "--tokenizer", str(tiny_model_dir), "--out", str(out)])
    report = json.loads(out.read_text(encoding="utf-8"))
    assert code == 0 and not report["errors"], report["errors"]
    runs = report["runs"]
    assert {(r["scenario"], r["path"]) for r in runs} == {(s, p) for s in ("2x32", "real-2x64") for p in ("hf", "ours")}
    # A fresh interpreter for every run: no two share a process, and none is this one.
    pids = [r["pid"] for r in runs]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids
    assert {(u["config"], u["path"]) for u in report["unavailable"]} == {("2x32", "liger"), ("real-2x64", "liger")}
    assert all("liger_kernel is not importable" in u["reason"] for u in report["unavailable"])
    assert all(r["tokens_per_s"] > 0 and r["trained_tokens_per_s"] > 0 for r in report["results"])

    (synthetic,) = [a for a in report["agreement"] if a["config"] == "2x32"]
    assert synthetic["loss_max_abs_diff"] < 1e-4 and abs(synthetic["loss_change_hf"]) > 1e-3

    # Real rows: the trained tokens of each timed step are the answer tokens of the examples it saw, whether
    # HF padded them into a batch or ours packed them; padding and prompts count for nothing.
    rows = real_rows(AutoTokenizer.from_pretrained(tiny_model_dir), DEFAULT_DATA_DIR, 40, 64, 0)
    for run in (r for r in runs if r["scenario"] == "real-2x64"):
        assert len(run["examples"]) == 2
        for picked, trained, tokens in zip(run["examples"], run["trained_tokens"], run["tokens"]):
            assert trained == sum(sum(1 for x in rows[i].labels[1:] if x != IGNORE_INDEX) for i in picked) > 0
            assert tokens == sum(len(rows[i].input_ids) for i in picked)
        if run["path"] == "hf":
            assert all(len(picked) == 2 for picked in run["examples"])
