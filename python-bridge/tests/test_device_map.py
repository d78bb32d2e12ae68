"""Loads spread over several devices: option checks, the too-many-GPUs error, and the devices a model reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwenbook_bridge.engine import DeviceUnavailableError, InvalidOptionError, LoadOptions, load_model
from qwenbook_bridge.engine.generate.generation import generate
from qwenbook_bridge.engine.models.device_map import parse_size, resolve_placement
from qwenbook_bridge.engine.generate.sampling import SamplingParams

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU-only worker says")


@cpu_only
def test_too_many_gpus_says_how_many_the_worker_sees() -> None:
    with pytest.raises(DeviceUnavailableError, match=r"asked for 2 GPUs, this worker sees 0 \(CPU only\)"):
        resolve_placement(["cuda:0", "cuda:1"])
    with pytest.raises(DeviceUnavailableError, match=r"asked for 1 GPU, this worker sees 0 \(CPU only\)"):
        resolve_placement({"maxMemory": {"cuda:0": "10GiB", "cpu": "1GiB"}})


@pytest.mark.parametrize("bad, message", [
    ("everywhere", "not understood"),
    ([], "empty list"),
    (["cuda:0", "cuda:0"], "names a device twice"),
    (["gpu0"], r"devices\[0\] 'gpu0' is not a device"),
    ({"maxMem": {"cpu": "1GiB"}}, "unknown keys"),
    ({"maxMemory": {"cpu": "lots"}}, "is not a size"),
    ({"maxMemory": {"cpu": 0}}, "more than 0 bytes"),
    (3, "must be a string, a list or an object"),
])
def test_bad_devices_are_refused_with_the_fix(bad: object, message: str) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        resolve_placement(bad)


def test_sizes_read_like_people_write_them() -> None:
    assert parse_size("20GiB", "x") == 20 * 2**30
    assert parse_size("1.5 GB", "x") == 1_500_000_000
    assert parse_size(4096, "x") == 4096


def test_device_and_devices_together_are_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(InvalidOptionError, match="either device"):
        load_model(str(tiny_model_dir), LoadOptions(device="cpu", devices="auto"))


@cpu_only
def test_auto_on_cpu_places_everything_on_cpu(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), LoadOptions(devices="auto"))
    assert loaded.info["devices"] == ["cpu"]
    assert loaded.model_id.endswith(":fp32:cpu")
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}


def test_device_map_load_reports_its_devices_and_generates(tiny_model_dir: Path) -> None:
    # A CPU-only budget still goes through accelerate's device map, the path multi-GPU loads take.
    loaded = load_model(str(tiny_model_dir), LoadOptions(devices={"maxMemory": {"cpu": "4GiB"}}))
    assert loaded.info["devices"] == ["cpu"]
    assert loaded.model_id.endswith(":fp32:cpu")
    plain = load_model(str(tiny_model_dir), LoadOptions(device="cpu"))
    opts = SamplingParams(max_tokens=6, greedy=True)
    msgs = [{"role": "user", "content": "hello"}]
    assert generate(loaded, msgs, opts).token_ids == generate(plain, msgs, opts).token_ids


def test_the_worker_takes_devices_and_lists_them_in_the_model_info_and_status(client, tiny_model_dir: Path) -> None:
    reply, _ = client.call("load", {"model": str(tiny_model_dir), "dtype": "fp32",
                                    "devices": {"maxMemory": {"cpu": "4GiB"}}})
    assert reply.content["status"] == "ok", reply.content
    assert reply.content["model"]["devices"] == ["cpu"]
    status, _ = client.call("status", {})
    assert [m["devices"] for m in status.content["models"]] == [["cpu"]]
    if not torch.cuda.is_available():
        reply, _ = client.call("load", {"model": str(tiny_model_dir), "devices": ["cuda:0", "cuda:1"]})
        assert reply.content["ename"] == "DeviceUnavailableError"
        assert "asked for 2 GPUs, this worker sees 0 (CPU only)" in reply.content["evalue"]
