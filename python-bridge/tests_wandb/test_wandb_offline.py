"""An offline wandb run holds the series the dashboard draws, read back from wandb's own .wandb file.

Apart from python-bridge/tests because it needs the wandb package, which the offline index this project's CI
installs from cannot provide (wandb 0.30.0 needs opentelemetry packages the index lacks): run it where wandb
installs, `python -m pytest python-bridge/tests_wandb`. The CPU suite checks the paths that need no wandb (the
install hint before any step, an import failure named, a several-rank run refused before its ranks start).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_train_reports import model, run, tok  # noqa: F401, F811  (fixtures, found by name)


def test_wandb_offline_run_holds_the_series(model, tok, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WANDB_MODE", "offline")
    result, events = run(model, tok, tmp_path / "wb", report=["wandb"])
    folder = Path(result.reports["wandb"])
    assert folder.parent == tmp_path / "wb" / "wandb" and folder.name.startswith("offline-run-")
    logged = read_wandb_history(next(folder.glob("*.wandb")))
    progress = [c for k, c in events if k == "train_progress"]
    assert [row["_step"] for row in logged if "train/loss" in row] == [c["step"] for c in progress]
    assert [row["train/loss"] for row in logged if "train/loss" in row] == pytest.approx([c["loss"] for c in progress])
    assert [row["eval/loss"] for row in logged if "eval/loss" in row] == pytest.approx(
        [c["eval_loss"] for k, c in events if k == "eval"])


def read_wandb_history(path: Path) -> list[dict]:
    """The history rows of a .wandb file: wandb's LevelDB-log framing (a 7-byte "W&B" header, 32 KiB blocks of
    records with a 7-byte header: CRC, length, type) around its own `Record` protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, payload, rows = 7, b"", []
    block = 32 * 1024
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a header: the block's tail is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        payload = chunk if kind in (1, 2) else payload + chunk  # FULL/FIRST start a record, MIDDLE/LAST extend it
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


