"""The shared atomic-write helper on its own: replacing, failing, disk-full detection, and clearing what a killed
writer left (including a folder it had moved aside just before it died)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from qwenbook_bridge.engine.files.atomic_write import AtomicTarget, is_disk_full, remove_leftovers, temporaries
from qwenbook_bridge.engine.errors import InsufficientDiskSpaceError


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_a_folder_is_replaced_only_when_the_new_one_is_complete(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half way"):
        with AtomicTarget(target, overwrite=True, is_dir=True) as tmp:
            (tmp / "a.txt").write_text("new, half")
            assert (target / "a.txt").read_text() == "old"
            raise RuntimeError("half way")
    assert (target / "a.txt").read_text() == "old" and temporaries(target) == []
    with AtomicTarget(target, overwrite=True, is_dir=True) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["b.txt"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_mid_write_removes_the_partial_file_and_says_where_and_how_much(tmp_path, code):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous")
    with pytest.raises(InsufficientDiskSpaceError) as info:
        with AtomicTarget(target, overwrite=True, is_dir=False, needed=5 * 10**6) as tmp:
            tmp.write_bytes(b"x" * 3000)
            raise OSError(code, os.strerror(code))
    text = str(info.value)
    assert text.startswith(f"No space left writing {target} (needs ~5.00 MB, ")
    assert " free on /" in text and "choose another path" in text
    assert isinstance(info.value.__cause__, OSError)
    assert target.read_bytes() == b"previous" and temporaries(target) == []


def test_disk_full_is_recognised_when_a_library_rewraps_it():
    assert is_disk_full(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from e
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("disk went away"))


def test_leftovers_of_a_dead_writer_go_and_those_of_a_live_one_stay(tmp_path):
    target = tmp_path / "merged"
    dead = tmp_path / f".merged.partial-{dead_pid()}-0a1b2c3d"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".merged.partial-{os.getppid()}-0a1b2c3d"  # the process that started this test is alive
    live.mkdir()
    other = tmp_path / f".other.partial-{dead_pid()}-0a1b2c3d"
    other.write_bytes(b"another target's")
    assert remove_leftovers(target) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_a_folder_moved_aside_by_a_writer_killed_between_its_renames_is_put_back(tmp_path):
    target = tmp_path / "checkpoint-4"
    pid = dead_pid()
    old = tmp_path / f".checkpoint-4.old-{pid}-0a1b2c3d"
    old.mkdir()
    (old / "trainer_state.json").write_text("{}")
    new = tmp_path / f".checkpoint-4.partial-{pid}-4e5f6a7b"
    new.mkdir()
    with AtomicTarget(target, overwrite=True, is_dir=True) as tmp:
        assert (target / "trainer_state.json").read_text() == "{}"  # restored before anything else
        assert not new.exists()
        (tmp / "trainer_state.json").write_text('{"step": 4}')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]
    assert (target / "trainer_state.json").read_text() == '{"step": 4}'


def test_a_restored_folder_is_not_overwritten_without_overwrite(tmp_path):
    target = tmp_path / "merged"
    old = tmp_path / f".merged.old-{dead_pid()}-0a1b2c3d"
    old.mkdir()
    (old / "config.json").write_text("{}")
    atomic = AtomicTarget(target, overwrite=False, is_dir=True)  # nothing there yet when it is made
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic:
            pass
    assert (target / "config.json").read_text() == "{}"
    assert temporaries(target) == []
