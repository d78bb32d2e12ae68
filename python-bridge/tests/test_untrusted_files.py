"""Files the worker trusts: its runtime file must be private, and a checkpoint is data, never code."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwenbook_bridge.engine.train import checkpoints as ckpt
from test_training import run  # the training tests' helper (tok and model are conftest fixtures)


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_the_worker_refuses_a_runtime_file_others_can_read(tmp_path, mode):
    folder = tmp_path / "runtime"
    folder.mkdir(mode=0o700)
    runtime_file = folder / "qwenbook-worker.json"
    runtime_file.write_text('{"key": "' + "0" * 64 + '", "pid": 1}')
    os.chmod(runtime_file, mode)
    log_file = folder / "qwenbook-worker.log"
    log_file.write_text("")
    os.chmod(log_file, 0o644)
    done = subprocess.run([sys.executable, "-m", "qwenbook_bridge.worker", "--runtime-file", str(runtime_file),
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"{runtime_file} is readable by group/others (mode 0{mode:o})" in done.stderr
    assert f"chmod 600 {runtime_file}" in done.stderr
    assert stat.S_IMODE(runtime_file.stat().st_mode) == mode  # left for the user to look at, not rewritten
    assert "refusing to start" in log_file.read_text() and stat.S_IMODE(log_file.stat().st_mode) == 0o600


class _Payload:
    """Unpickling this calls exec: what a hostile training_state.pt would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_resume_refuses_a_training_state_that_would_run_code(model, tok, tmp_path):  # noqa: F811
    first, _ = run(model, tok, tmp_path / "run", max_steps=2, cancel_at=1)
    assert first.status == "cancelled"
    checkpoint = tmp_path / "run" / "checkpoint-1"
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Payload(marker)}, checkpoint / ckpt.TRAINING_STATE)
    with pytest.raises(ckpt.CheckpointError, match="cannot read training_state.pt") as failure:
        run(model, tok, tmp_path / "run", max_steps=2, resume_from=str(tmp_path / "run"))
    assert "weights_only" in str(failure.value) or "Unsupported global" in str(failure.value)
    assert not marker.exists()
    # The same file would have run the code under a plain torch.load: the test's payload is real.
    torch.load(checkpoint / ckpt.TRAINING_STATE, weights_only=False)
    assert marker.read_text() == "ran"


def test_no_module_loads_pickles_without_weights_only():
    package = Path(ckpt.__file__).resolve().parents[1]
    offenders = []
    for source in package.rglob("*.py"):
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            if ("torch.load(" in line and "weights_only=True" not in line) or "pickle.load" in line:
                offenders.append(f"{source.relative_to(package)}:{number}: {line.strip()}")
    assert offenders == []
