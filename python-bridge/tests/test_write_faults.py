"""Faults while writing: a full disk and a kill -9 in the middle of each model writer (a training checkpoint, a
merged safetensors folder, a GGUF file, a quantized folder) leave the previous target as it was and loadable,
nothing half written under the target name, and a readable error; the next write succeeds and clears what the
killed writer left behind.

Faults are injected in the test only: `builtins.open` is wrapped for files opened for writing inside a writer's
hidden staging sibling, so the wrapper sees the writer's own file writes (safetensors shards, the GGUF stream,
torch.save of the training state, JSON). For a kill, a writer forked from one process that loaded the model pauses
right after its first write to the chosen file and says so on stdout; the test kills it there with SIGKILL.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from qwenbook_bridge.engine.files import atomic_write
from qwenbook_bridge.engine.train import checkpoints as ckpt
from qwenbook_bridge.engine.data.datasets import DatasetSpec
from qwenbook_bridge.engine.errors import InsufficientDiskSpaceError
from qwenbook_bridge.engine.export.gguf import GgufConfig, export_gguf
from qwenbook_bridge.engine.export.gguf_read import GgufFile
from qwenbook_bridge.engine.export.merge import save_model
from qwenbook_bridge.engine.quant.config import QuantConfig
from qwenbook_bridge.engine.quant.folder import load_quantized
from qwenbook_bridge.engine.export.quantized import save_quantized
from qwenbook_bridge.engine.files.save import SaveConfig, read_safetensors_folder
from qwenbook_bridge.engine.train.loop import train
from qwenbook_bridge.engine.train.config import LoraSettings, TrainConfig

HERE = Path(__file__).resolve().parent
ROWS = [{"instruction": f"问题{i}", "output": f"回答{i}号"} for i in range(8)]
FREE_RE = re.compile(r"\(needs ~\d+(\.\d+)? (GB|MB|kB|B), \d+(\.\d+)? (GB|MB|kB|B) free on /[^)]*\): free space or "
                     r"choose another (folder|path)")


# ---------------------------------------------------------------- the four writers, each over an existing target

def write_merged(model: Any, tok: Any, target: Path) -> None:
    save_model(model, tok, target, SaveConfig(overwrite=True))


def write_quantized(model: Any, tok: Any, target: Path) -> None:
    save_quantized(model, tok, target, SaveConfig(overwrite=True), quant=QuantConfig(method="int8"), evaluate=False)


def write_gguf(model: Any, tok: Any, target: Path) -> None:
    export_gguf(model, tok, target, GgufConfig(type="f16", overwrite=True), evaluate=False)


def train_run(model: Any, tok: Any, out: Path, resume: bool = False) -> Any:
    """Three LoRA steps with a checkpoint after each; `resume` continues from the newest checkpoint in `out`."""
    cfg = TrainConfig(output_dir=str(out), max_length=32, batch_size=2, grad_accum=1, max_steps=3, lr=1e-3,
                      save_every=1, lora=LoraSettings(r=4), resume_from=str(out) if resume else None)
    return train(model, tok, [DatasetSpec(ROWS)], cfg, on_event=lambda _k, _c: None, cancel=threading.Event())


WRITERS: dict[str, tuple[Callable[[Any, Any, Path], None], str]] = {
    # name -> (writer, target name); the file the kill pauses in is given in test_kill_during_write
    "merge": (write_merged, "merged"),
    "quant": (write_quantized, "quantized"),
    "gguf": (write_gguf, "model.gguf"),
}


def load_tiny(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def tiny_pair(tiny_model_dir):
    return load_tiny(tiny_model_dir)


@pytest.fixture
def fresh_model(tiny_model_dir):
    """Training changes the model it is given (and gives it back); each training test gets its own."""
    return load_tiny(tiny_model_dir)


# ---------------------------------------------------------------- checks

def digest(path: Path) -> dict[str, str]:
    """Every file under `path` (or the file itself) -> sha256: the previous target must come through unchanged."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def check_loadable(kind: str, target: Path, tok: Any) -> None:
    if kind == "merge":
        from transformers import AutoModelForCausalLM

        assert read_safetensors_folder(target)
        AutoModelForCausalLM.from_pretrained(target)
    elif kind == "quant":
        model, _ = load_quantized(target, with_tokenizer=False)
        assert model is not None
    elif kind == "gguf":
        with GgufFile(target) as gf:
            assert "token_embd.weight" in gf.tensors
            assert gf.dequantize("token_embd.weight").numel() > 0
    else:
        state = ckpt.read_trainer_state(target)
        assert state["step"] >= 1
        ckpt.read_training_state(target, torch.device("cpu"))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if atomic_write.is_temporary(p.name))


class _Limited:
    """A file whose writes stop with ENOSPC once the shared budget is spent (what fits is written first)."""

    def __init__(self, f: Any, budget: list[int]) -> None:
        self._f, self._budget = f, budget

    def write(self, data: Any) -> int:
        n = len(data)
        if n <= self._budget[0]:
            self._budget[0] -= n
            return self._f.write(data)
        self._f.write(data[:self._budget[0]])
        self._budget[0] = 0
        self._f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _Limited:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.__exit__(*exc)


def inject_enospc(monkeypatch: pytest.MonkeyPatch, marker: str, after_bytes: int) -> list[Path]:
    """Writes to files opened under a path containing `marker` fail with ENOSPC after `after_bytes` in all."""
    real_open = builtins.open
    budget = [after_bytes]
    opened: list[Path] = []

    def limited_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and marker in os.fspath(file) and any(c in mode for c in "wax"):
            opened.append(Path(file))
            return _Limited(f, budget)
        return f

    monkeypatch.setattr(builtins, "open", limited_open)
    return opened


def check_disk_full_error(e: InsufficientDiskSpaceError, target: Path) -> None:
    text = str(e)
    assert "\n" not in text
    assert text.startswith(f"No space left writing {target} "), text
    assert FREE_RE.search(text), text


# ---------------------------------------------------------------- disk full

@pytest.mark.parametrize("kind", ["merge", "quant", "gguf"])
def test_disk_full_while_exporting_keeps_the_previous_target(kind, tiny_pair, tmp_path, monkeypatch):
    model, tok = tiny_pair
    write, name = WRITERS[kind]
    target = tmp_path / name
    write(model, tok, target)
    before = digest(target)

    opened = inject_enospc(monkeypatch, f".{name}{atomic_write.PARTIAL}", after_bytes=64 * 1024)
    with pytest.raises(InsufficientDiskSpaceError) as info:
        write(model, tok, target)
    monkeypatch.undo()

    assert opened, "the fault was never reached: the writer did not write into its staging sibling"
    check_disk_full_error(info.value, target)
    assert digest(target) == before
    check_loadable(kind, target, tok)
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_disk_full_at_a_checkpoint_stops_training_and_keeps_the_earlier_one(fresh_model, tmp_path, monkeypatch):
    model, tok = fresh_model
    out = tmp_path / "run"
    opened = inject_enospc(monkeypatch, f".checkpoint-2{atomic_write.PARTIAL}", after_bytes=1000)
    with pytest.raises(InsufficientDiskSpaceError) as info:
        train_run(model, tok, out)
    monkeypatch.undo()

    assert opened
    check_disk_full_error(info.value, out / "checkpoint-2")
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"]
    assert leftovers(out) == []
    check_loadable("checkpoint", out / "checkpoint-1", tok)
    result = train_run(model, tok, out, resume=True)
    assert result.status == "completed" and result.step == 3
    assert result.resumed_from == str(out / "checkpoint-1")


def test_disk_full_error_is_an_engine_error_the_server_sends_as_it_is():
    """EngineError: the server replies with ename + evalue (and logs a warning, not a crash)."""
    from qwenbook_bridge.engine.errors import EngineError
    from qwenbook_bridge.protocol import exception_content

    e = atomic_write.disk_full_error(Path("/tmp/out/merged"), 1_200_000_000, is_dir=True)
    assert isinstance(e, EngineError) and isinstance(e, OSError)
    content = exception_content(e)
    assert content["ename"] == "InsufficientDiskSpaceError"
    assert content["evalue"].startswith("No space left writing /tmp/out/merged (needs ~1.20 GB, ")
    assert FREE_RE.search(content["evalue"])


# ---------------------------------------------------------------- kill -9

# One process imports torch and loads the tiny model once, then forks a writer for each kill: a fresh interpreter
# per kill paid ~4 s of imports and loading each time. Each forked writer starts from the same untouched model, as a
# fresh process would, and is killed with SIGKILL as one would be; the forking process reports how it ended.
FORKER = r'''
import builtins, json, os, sys, traceback
sys.path[:0] = [{tests!r}, {bridge!r}]
real_open = builtins.open

class Pausing:
    # The writer's first write to the chosen file goes to disk, then the process waits to be killed.
    def __init__(self, f, hold):
        self._f, self._hold = f, hold
    def write(self, data):
        n = self._f.write(data)
        self._f.flush()
        os.fsync(self._f.fileno())
        print("paused", os.getpid(), self._f.name, flush=True)
        os.read(self._hold, 1)  # returns only once the forking process is gone: the test went away
        os._exit(3)
    def __getattr__(self, name):
        return getattr(self._f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self._f.__exit__(*exc)

def pausing_open(mark, suffix, hold):
    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        path = os.fspath(file) if isinstance(file, (str, os.PathLike)) else ""
        if mark in path and path.endswith(suffix) and any(c in mode for c in "wax"):
            return Pausing(f, hold)
        return f
    return open_

import test_write_faults as t
model, tok = t.load_tiny({model_dir!r})
print("ready", flush=True)
for line in sys.stdin:
    mark, suffix, cwd, call = json.loads(line)
    hold, held = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(held)
        try:
            os.chdir(cwd)
            builtins.open = pausing_open(mark, suffix, hold)
            exec(call)
            print("finished without pausing", flush=True)
        except BaseException:
            traceback.print_exc()
            print("failed before pausing (its traceback is on stderr)", flush=True)
        finally:
            os._exit(0)
    os.close(hold)
    _, status = os.waitpid(pid, 0)
    os.close(held)
    print("ended", -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status), flush=True)
'''


class Writers:
    """The forking process: `kill_mid_write` runs one writer in a fork of it and kills it mid-write."""

    def __init__(self, model_dir: Path, folder: Path) -> None:
        script = folder / "writers.py"
        script.write_text(FORKER.format(tests=str(HERE), bridge=str(HERE.parent), model_dir=str(model_dir)),
                          encoding="utf-8")
        self.stderr = folder / "writers.err"
        with self.stderr.open("w", encoding="utf-8") as err:
            self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True, cwd=folder)
        self.expect("ready")

    def expect(self, word: str) -> list[str]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.split()[:1] == [word], \
            f"expected {word!r} from the writer, got {line!r}\n{self.stderr.read_text(encoding='utf-8')[-3000:]}"
        return line.split()[1:]

    def kill_mid_write(self, cwd: Path, mark: str, suffix: str, call: str) -> Path:
        """Runs `call` in a fork, kills -9 it once it has written its first chunk; returns the partial file."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([mark, suffix, str(cwd), call]) + "\n")
        self.proc.stdin.flush()
        pid, name = self.expect("paused")  # readiness: the writer reports the write it is paused after
        partial = Path(name)
        assert partial.is_file() and partial.stat().st_size > 0  # the temp output exists and holds data
        assert atomic_write.PARTIAL in str(partial)
        os.kill(int(pid), signal.SIGKILL)
        assert self.expect("ended") == [str(-signal.SIGKILL)]
        return partial

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()  # the forking process's loop ends
        try:
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def writers(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="qwenbook-writers-") as folder:
        forker = Writers(tiny_model_dir, Path(folder))
        yield forker
        forker.close()


@pytest.mark.parametrize("kind, suffix", [("merge", ".safetensors"), ("quant", ".safetensors"), ("gguf", "")])
def test_kill_during_export_keeps_the_previous_target(kind, suffix, tiny_pair, writers, tmp_path):
    model, tok = tiny_pair
    write, name = WRITERS[kind]
    target = tmp_path / name
    write(model, tok, target)
    before = digest(target)

    mark = f".{name}{atomic_write.PARTIAL}"
    partial = writers.kill_mid_write(tmp_path, mark, suffix,
                                     f"t.WRITERS[{kind!r}][0](model, tok, t.Path({str(target)!r}))")
    assert partial.exists()  # what the killed writer left, hidden
    assert digest(target) == before
    check_loadable(kind, target, tok)
    assert [n for n in leftovers(tmp_path)] and all(n.startswith(mark) for n in leftovers(tmp_path))

    write(model, tok, target)  # the next write to the same name succeeds and clears the leftovers
    assert leftovers(tmp_path) == []
    check_loadable(kind, target, tok)


def test_kill_during_a_checkpoint_keeps_the_earlier_one_and_resume_clears_it(fresh_model, writers, tmp_path):
    model, tok = fresh_model
    out = tmp_path / "run"
    mark = f".checkpoint-2{atomic_write.PARTIAL}"
    partial = writers.kill_mid_write(tmp_path, mark, ckpt.TRAINING_STATE,
                                     f"t.train_run(model, tok, t.Path({str(out)!r}))")
    assert partial.parent.name.startswith(mark)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"]
    assert ckpt.resolve_checkpoint(out) == out / "checkpoint-1"
    assert not (out / "checkpoint-2").exists()
    check_loadable("checkpoint", out / "checkpoint-1", tok)

    result = train_run(model, tok, out, resume=True)
    assert result.status == "completed" and result.step == 3
    assert result.resumed_from == str(out / "checkpoint-1")
    assert leftovers(out) == []
    assert json.loads((out / "train_result.json").read_text(encoding="utf-8"))["step"] == 3
