"""The DPO step benchmark on the CPU: both paths' steps on the tiny model start from the same weights and
initialization and give the same losses (so the timing compares the same work), and a bad path is reported.
Both paths run here in this process; `--smoke` runs each in its own (about 20 s, so not here)."""

from __future__ import annotations

import json

import pytest

from qwenbook_bridge.bench import preference as bench

pytest.importorskip("trl")


def test_trl_and_ours_take_the_same_dpo_steps(tiny_model_dir):
    args = bench.parser().parse_args(["--device", "cpu", "--model", str(tiny_model_dir), "--config", "1x8x8",
                                      "--warmup", "1", "--steps", "1"])
    trl, ours = bench.run_path("trl", args), bench.run_path("ours", args)
    # Step 1: the adapter starts at zero, so the policy is its reference and the loss is log 2 on both.
    assert trl["losses"][0] == pytest.approx(0.693147, abs=1e-6) == ours["losses"][0]
    assert abs(trl["losses"][1] - ours["losses"][1]) < 1e-4 and trl["losses"][1] != trl["losses"][0]
    assert trl["step_s"] > 0 and ours["pairs_per_s"] > 0 and len(ours["step_times_s"]) == 1


def test_an_unknown_path_is_reported(tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(["--paths", "trl-fast", "--out", str(out)]) == 1
    assert json.loads(out.read_text())["errors"] == ["unknown path 'trl-fast'; known: trl, ours"]
