"""`train` requests with `distributed` options through a real worker: two ranks under torchrun (gloo on CPUs)
stream rank 0's events with every rank's memory, and bad options fail before any rank starts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

ROWS = [{"instruction": f"问题{i}", "output": f"回答{i}号，" * (1 + i % 3)} for i in range(8)]
SMALL = {"max_length": 48, "batch_size": 1, "grad_accum": 2, "max_steps": 2, "lr": 1e-3, "lora": {"r": 4},
         "log_every": 1}


def request(model_id: str, out: Path, distributed: dict, rows=ROWS, **options) -> dict:
    return {"model_id": model_id, "config": {"output_dir": str(out), **copy.deepcopy(SMALL), **options},
            "datasets": [{"rows": rows}], "distributed": distributed}


def test_two_ranks_train_through_the_worker_and_report_every_ranks_memory(client, model_id, tmp_path):
    reply, events = client.call("train", request(model_id, tmp_path / "run", {"devices": 2, "strategy": "ddp"}))
    assert reply.content["status"] == "ok", reply.content
    assert reply.content["outcome"] == "completed" and reply.content["step"] == 2
    begin = next(e.content for e in events if e.msg_type == "train_begin")
    assert begin["world_size"] == 2 and begin["strategy"] == "ddp"
    assert begin["rows_per_step"] == 2  # batch 1 × gradAccum 2: the global batch, as on one device
    progress = [e.content for e in events if e.msg_type == "train_progress"]
    assert [p["step"] for p in progress] == [1, 2]
    assert [m["rank"] for m in progress[-1]["rank_memory"]] == [0, 1]
    assert all(m["used"] > 0 for m in progress[-1]["rank_memory"])
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    runs, _ = client.call("runs", {})
    assert any(r["output_dir"] == str(tmp_path / "run") and r["state"] == "completed" for r in runs.content["runs"])


@pytest.mark.parametrize("distributed, options, ename, words", [
    ({"devices": 2}, {"grad_accum": 3}, "InvalidOptionError", ["gradAccum 3 does not split over 2 ranks", "gradAccum(4)"]),
    ({"devices": 2, "cluster": {"workers": 2}}, {}, "InvalidOptionError", ["either devices", "not both"]),
    ({"strategy": "fsdp"}, {}, "InvalidOptionError", ["either devices", "or cluster"]),
    ({"devices": 0}, {}, "InvalidRequest", ["distributed.devices must be at least 1"]),
    ({"devices": 2, "strategy": "zero3"}, {}, "InvalidRequest", ["distributed.strategy"]),
])
def test_bad_options_fail_before_any_rank_starts(client, model_id, tmp_path, distributed, options, ename, words):
    reply, events = client.call("train", request(model_id, tmp_path / "bad", distributed, **options))
    assert events == []
    assert reply.content["ename"] == ename, reply.content
    for w in words:
        assert w in reply.content["evalue"], reply.content["evalue"]
    assert not (tmp_path / "bad").exists()


def test_a_bad_row_is_found_in_the_worker_not_in_every_rank(client, model_id, tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c"}]
    reply, events = client.call("train", request(model_id, tmp_path / "bad", {"devices": 2}, rows=rows))
    assert events == []
    assert reply.content["ename"] == "DatasetError" and "row 2" in reply.content["evalue"], reply.content


def test_a_ray_address_that_does_not_answer_is_named_in_the_error(client, model_id, tmp_path):
    cluster = {"address": "127.0.0.1:9", "workers": 2, "connect_timeout_s": 2}
    reply, events = client.call("train", request(model_id, tmp_path / "far", {"cluster": cluster}))
    assert events == []
    assert reply.content["ename"] == "RayClusterError", reply.content
    assert "127.0.0.1:9" in reply.content["evalue"]
