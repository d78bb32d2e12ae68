"""A worker started with --root reads and writes client-given paths only inside that folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from qwenbook_bridge.engine import InvalidOptionError
from qwenbook_bridge.handlers.paths import ROOT_ENV, resolve_user_path, worker_root
from wire import Client, WorkerProcess


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def place(tmp_path_factory, tiny_model_dir):
    """root/ with home/tiny (a model inside the root), and outside/ next to it."""
    base = tmp_path_factory.mktemp("paths")
    root, outside = base / "root", base / "outside"
    (root / "home").mkdir(parents=True)
    outside.mkdir()
    shutil.copytree(tiny_model_dir, root / "home" / "tiny", copy_function=_link_or_copy)
    rows = [{"instruction": "hi", "output": "hello"}]
    for folder in (root, outside):
        (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    return base, root, outside


@pytest.fixture(scope="module")
def client(place):
    base, root, _ = place
    (base / "worker").mkdir()
    # HOME inside the root, so that "~/tiny" names a folder in it.
    worker = WorkerProcess(base / "worker", args=["--root", str(root)], env={"HOME": str(root / "home")})
    c = Client(worker.info)
    yield c
    c.close()
    worker.stop()


@pytest.fixture(scope="module")
def model_id(client):
    reply, _ = client.call("load", {"model": "~/tiny", "dtype": "fp32"})
    assert reply.content["status"] == "ok", reply.content
    return reply.content["model"]["model_id"]


def refused(client: Client, msg_type: str, content: dict) -> str:
    reply, _ = client.call(msg_type, content)
    assert reply.content["status"] == "error", reply.content
    assert reply.content["ename"] == "PathOutsideRootError", reply.content
    return reply.content["evalue"]


def test_a_model_outside_the_root_is_refused_by_path_and_through_a_symlink(client, place, tiny_model_dir):
    _, root, outside = place
    message = refused(client, "load", {"model": str(tiny_model_dir)})
    assert f"model {str(tiny_model_dir)!r} is outside this worker's root {root}" in message
    message = refused(client, "load", {"model": str(root / "escape")})
    assert f"resolves to {outside}" in message and str(root) in message
    refused(client, "load", {"model": f"{root}/../outside"})


def test_a_model_inside_the_root_loads_with_home_expanded(model_id):
    assert model_id


def test_training_paths_outside_the_root_are_refused(client, model_id, place):
    _, root, outside = place
    inside = {"rows": [{"instruction": "a", "output": "b"}]}

    def train(config: dict, datasets: list[dict]) -> str:
        return refused(client, "train", {"model_id": model_id, "config": config, "datasets": datasets})

    assert "config.output_dir" in train({"output_dir": str(outside / "run")}, [inside])
    assert "config.output_dir" in train({"output_dir": str(root / "escape" / "run")}, [inside])
    assert "config.resume_from" in train({"output_dir": str(root / "run"), "resume_from": str(outside)}, [inside])
    assert "datasets[0].path" in train({"output_dir": str(root / "run")}, [{"path": str(outside / "data.jsonl")}])
    assert not (outside / "run").exists() and not (root / "run").exists()


def test_datasets_and_adapters_are_checked_for_every_request_that_reads_them(client, model_id, place):
    _, root, outside = place
    refused(client, "train_preview", {"model_id": model_id, "datasets": [{"path": str(outside / "data.jsonl")}]})
    reply, _ = client.call("train_preview", {"model_id": model_id, "datasets": [{"path": str(root / "data.jsonl")}]})
    assert reply.content["status"] == "ok", reply.content
    assert "path" in refused(client, "adapter_load", {"model_id": model_id, "path": str(outside)})


def test_save_and_export_targets_adapters_and_calibration_outside_the_root_are_refused(client, model_id, place):
    _, root, outside = place
    assert "save target" in refused(client, "save", {"model_id": model_id, "target": str(outside / "saved")})
    assert "export target" in refused(client, "export", {"model_id": model_id,
                                                         "format": "gguf", "target": str(root / "escape" / "m.gguf")})
    assert "adapters[0]" in refused(client, "save", {"model_id": model_id, "target": str(root / "saved"),
                                                    "adapters": [str(outside)]})
    assert "quant.calibration" in refused(client, "save", {
        "model_id": model_id, "target": str(root / "saved"),
        "quant": {"method": "int4", "calibration": str(outside / "data.jsonl")}})
    assert sorted(p.name for p in outside.iterdir()) == ["data.jsonl"]


def test_the_root_comes_from_the_environment_and_must_exist(tmp_path, monkeypatch):
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    assert worker_root() == tmp_path.resolve()
    with pytest.raises(ValueError, match="is not an existing folder"):
        worker_root(tmp_path / "missing")
    monkeypatch.delenv(ROOT_ENV)
    assert worker_root() is None


def test_paths_are_expanded_and_must_be_absolute(tmp_path):
    home = Path("~").expanduser()
    assert resolve_user_path("~/x", None, "target") == home / "x"
    with pytest.raises(InvalidOptionError, match="target must be an absolute path"):
        resolve_user_path("runs/x", tmp_path, "target")
    assert resolve_user_path(str(tmp_path / "a" / "b"), tmp_path.resolve(), "target") == tmp_path / "a" / "b"
