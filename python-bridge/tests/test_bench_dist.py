"""The several-GPU benchmark's machinery on CPUs (gloo): the same global batch on 1 and 2 ranks, DDP and
FSDP2, gives the same losses, and the spread-generation section reports both paths. No timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

from qwenbook_bridge.bench.dist import main


def test_the_benchmark_compares_rank_counts_on_the_same_global_batch(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "bench-dist.json"
    code = main(["--small", "--ddp", "1,2", "--fsdp", "2", "--fsdp-method", "lora", "--spread", "small",
                 "--tokenizer", str(tiny_model_dir), "--length", "32", "--micro-rows", "1", "--global-micro", "2",
                 "--warmup", "1", "--steps", "1", "--new-tokens", "4", "--long-prompt", "40", "--out", str(out)])
    report = json.loads(out.read_text(encoding="utf-8"))
    assert code == 0, report["errors"]
    rows = {(r["strategy"], r["ranks"]): r for r in report["summary"]}
    assert set(rows) == {("ddp", 1), ("ddp", 2), ("fsdp", 2)}
    # fp32 on CPUs: the two-rank runs differ from one process only in summation order.
    assert rows[("ddp", 2)]["loss_max_abs_diff_vs_base"] < 1e-4
    assert rows[("ddp", 2)]["base_ranks"] == 1
    fsdp = next(r for r in report["training"] if r["strategy"] == "fsdp")
    one = next(r for r in report["training"] if r["strategy"] == "ddp" and r["ranks"] == 1)
    assert max(abs(a - b) for a, b in zip(fsdp["losses"], one["losses"])) < 1e-4
    assert all(r["tokens_per_s"] > 0 and len(r["peak_gib_per_rank"]) == r["ranks"] for r in report["summary"])
    spread = report["spread"]
    assert spread["ours"]["completion_tokens"] == 4 and spread["ours"]["long_prompt_tokens"] >= 40
    assert spread["hf"]["tokens_per_s"] > 0 and spread["memory"]
