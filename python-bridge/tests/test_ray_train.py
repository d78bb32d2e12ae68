"""Ray Train runs (ray_launch) on a local one-node Ray cluster of 2 CPUs: the same run as one process, cancel,
a failing rank's own words, and the errors a user meets before training starts (no cluster, too few CPUs, an
output folder the nodes cannot write).

Each Ray Train launch starts about ten processes (its controller and helper actors, the workers, which import
torch), so the module launches twice: a failing run that connects itself to the head's GCS address, then, in one
Ray Client session of this process, a 2-worker run that is compared with one process and then cancelled (its
events and the cancel cross the client). The tests that need no connected session run first and say so if one is.

Tolerance: as in test_dist_train.py, losses of the 2-worker run match the 1-process run with the same global
batch within 1e-4 (fp32); they differ only in the order gradients are summed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from qwenbook_bridge.distributed.torchrun import DistributedRunError
from qwenbook_bridge.engine.errors import DeviceUnavailableError, InvalidOptionError
from qwenbook_bridge.distributed import ray_train as ray_launch
from qwenbook_bridge.distributed.ray_train import RayClusterError, launch

from test_dist_train import assert_two_ranks_match_one_process_then_cancel, recording_cancel, settings, write_run

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_node(temp: str) -> None:
    """Ends this node's processes (those started with its temp dir, and their children) by pid:
    `ray stop` would end every Ray node of this user on the machine."""
    procs: list[psutil.Process] = []
    for p in psutil.process_iter(["cmdline"]):
        if any(temp in part for part in p.info["cmdline"] or ()):
            try:
                procs += [p, *p.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


@dataclass(frozen=True)
class Cluster:
    address: str  # the head's GCS, host:port
    client: str  # Ray Client, ray://host:port
    temp: str  # the head's temp dir, where its logs are


def _client_server_logs(temp: str) -> str:
    """The tails of the head's Ray Client server logs, where a failed per-connection server says why."""
    tails = []
    for log in sorted(Path(temp).glob("session_*/logs/ray_client_server*.err")):
        text = log.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            tails.append(f"--- {log.name}\n{text[-2000:]}")
    return "\n".join(tails) or "(no Ray Client server log)"


_HEAD_START_TRIES = 3
_CLIENT_CONNECT_S = 300


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head node with 2 CPUs for this module."""
    # Ray's socket paths live under the temp dir and must stay short (AF_UNIX paths are capped near 107 bytes).
    temp = tempfile.mkdtemp(prefix="qbray", dir="/tmp")
    # Ray starts its workers at niceness 15, so any other busy process on the host starves them and a test
    # crawls; this head's workers run at the test's own priority instead. A Ray Client server process started for
    # a connection exits when no client reaches it within 30 s, which a loaded 2-core host can exceed (the
    # connection then fails with "Starting Ray client server failed"); this head allows 300 s. Ray Train's
    # preemption watcher (one more actor process per launch) watches for nodes being drained, which a one-node
    # test cluster never is.
    env = {**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1", "RAY_worker_niceness": "0",
           "TIMEOUT_FOR_SPECIFIC_SERVER_S": "300", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    try:
        for attempt in range(1, _HEAD_START_TRIES + 1):
            port, client_port = _free_port(), _free_port()
            started = subprocess.run(
                [str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                 "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}",
                 f"--ray-client-server-port={client_port}", f"--dashboard-port={_free_port()}",
                 f"--dashboard-agent-listen-port={_free_port()}"],
                capture_output=True, text=True, env=env, timeout=180)
            said = started.stdout[-3000:] + started.stderr[-3000:]
            # On a host whose cores are all busy the head can miss its own startup deadline ("timed out during
            # startup"); what it started is ended and a fresh head tried, as a person would run `ray start` again.
            if started.returncode == 0 or "timed out during startup" not in said or attempt == _HEAD_START_TRIES:
                break
            _stop_node(temp)
        assert started.returncode == 0, said
        yield Cluster(f"127.0.0.1:{port}", f"ray://127.0.0.1:{client_port}", temp)
    finally:
        _stop_node(temp)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def unconnected() -> None:
    """For tests where launch connects (or refuses to) itself: launch uses a session already connected as it is."""
    import ray

    assert not ray.is_initialized(), "a Ray session is connected already: run this module's tests in file order"


@pytest.fixture(scope="module")
def client_session(cluster: Cluster) -> Iterator[Cluster]:
    """This process connected to the head through Ray Client, once for the tests that use it: the client server
    starts a process per connection, which a loaded host can delay or, before the head allowed it longer, lose.
    A connection whose server dies starting is tried again, bounded, as launch's own connect does."""
    import ray

    deadline = time.monotonic() + _CLIENT_CONNECT_S
    while True:
        try:
            ray_launch._connect(ray, cluster.client, timeout_s=max(1.0, deadline - time.monotonic()))
            break
        except RayClusterError as e:
            if time.monotonic() >= deadline or not ray_launch._is_client_start_failure(e.__cause__ or e):
                raise AssertionError(f"{e}\n{_client_server_logs(cluster.temp)}") from e
    try:
        assert ray.cluster_resources().get("CPU") == 2
        yield cluster
    finally:
        ray.shutdown()


def test_a_cluster_that_does_not_answer_is_named_quickly(unconnected: None, tmp_path: Path,
                                                       tiny_model_dir: Path) -> None:
    run = json.loads(write_run(tmp_path, tiny_model_dir, settings(tmp_path / "ddp")).read_text(encoding="utf-8"))
    del run["events"]
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(RayClusterError, match=f"cannot reach the Ray cluster at {address}"):
        launch(run, 2, 0, address, tmp_path / "launch", connect_timeout_s=5)
    assert time.monotonic() - start < 5


class _FlakyRay:
    """ray.init that fails the way a loaded Ray Client head does, `failures` times, then connects."""

    def __init__(self, failures: int, said: str) -> None:
        self.failures, self.said, self.calls = failures, said, 0

    def init(self, **_: object) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionAbortedError(f"Initialization failure from server:\n{self.said}")


@pytest.fixture
def listening() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"ray://127.0.0.1:{s.getsockname()[1]}"


def test_a_client_server_that_dies_starting_is_retried_with_a_fresh_connection(listening: str) -> None:
    ray = _FlakyRay(2, "Traceback ...\nRuntimeError: Starting Ray client server failed. See "
                       "ray_client_server_23001.err for detailed logs.")
    ray_launch._connect(ray, listening, timeout_s=30)
    assert ray.calls == 3


def test_a_client_server_that_dies_at_once_is_retried_with_a_fresh_connection(listening: str) -> None:
    # Seen on a loaded 2-core host: the per-connection server aborted in gRPC right after it was forked, and the
    # proxy, reading its command line, met a zombie.
    ray = _FlakyRay(1, "Traceback (most recent call last):\n  File \".../proxier.py\", line 396, in "
                       "start_specific_server\n    cmd = psutil_proc.cmdline()\npsutil.ZombieProcess: PID still "
                       "exists but it's a zombie (pid=21422)")
    ray_launch._connect(ray, listening, timeout_s=30)
    assert ray.calls == 2


def test_a_client_server_that_keeps_dying_is_reported_with_its_words(listening: str) -> None:
    ray = _FlakyRay(10, "RuntimeError: Starting Ray client server failed. See ray_client_server_23001.err")
    with pytest.raises(RayClusterError, match=r"(?s)cannot connect to .* Starting Ray client server failed.*23001\.err"):
        ray_launch._connect(ray, listening, timeout_s=30)
    assert ray.calls == ray_launch._CLIENT_START_TRIES


def test_other_connection_failures_are_not_retried(listening: str) -> None:
    ray = _FlakyRay(1, "ray client version mismatch: client 2.40, server 2.51")
    with pytest.raises(RayClusterError, match="version mismatch"):
        ray_launch._connect(ray, listening, timeout_s=30)
    assert ray.calls == 1


def test_no_address_says_how_to_give_one(unconnected: None, tmp_path: Path, tiny_model_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    run = json.loads(write_run(tmp_path, tiny_model_dir, settings(tmp_path / "ddp")).read_text(encoding="utf-8"))
    del run["events"]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(InvalidOptionError, match="pass an address .* or set RAY_ADDRESS"):
        launch(run, 2, 0, None, tmp_path / "launch")


def test_a_failing_rank_raises_with_its_own_words(cluster: Cluster, unconnected: None, tmp_path: Path) -> None:
    # launch connects itself to the head's GCS address here (and disconnects), the way `ray start` users call it.
    # One worker: a rank's words reach the driver the same way from any rank, and each Ray Train worker is a
    # process importing torch and transformers (~8 s of CPU) before it can fail.
    import ray

    run = {"model": str(tmp_path / "missing"), "datasets": [{"path": "x.jsonl"}],
           "train": {"output_dir": str(tmp_path / "out")}}
    with pytest.raises(DistributedRunError, match=r"1-rank Ray Train run failed: rank 0: .*does not exist"):
        launch(run, 1, 0, cluster.address, tmp_path / "launch")
    assert not ray.is_initialized()


def test_an_output_folder_a_node_cannot_write_is_named_before_training(client_session: Cluster, tmp_path: Path,
                                                                       tiny_model_dir: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    out = blocker / "ddp"
    run = json.loads(write_run(tmp_path, tiny_model_dir, settings(out)).read_text(encoding="utf-8"))
    del run["events"]
    said = rf"node \S+ \(\w+\) cannot use the run's output folder {re.escape(str(out))}: cannot write"
    with pytest.raises(RayClusterError, match=said):
        launch(run, 2, 0, client_session.client, tmp_path / "launch")


def test_more_workers_than_the_cluster_has_fail_before_training(client_session: Cluster, tmp_path: Path,
                                                               tiny_model_dir: Path) -> None:
    run = json.loads(write_run(tmp_path, tiny_model_dir, settings(tmp_path / "ddp")).read_text(encoding="utf-8"))
    del run["events"]
    seen: list[str] = []
    with pytest.raises(DeviceUnavailableError,
                       match=rf"3 CPUs and 0 GPUs, but the Ray cluster at {client_session.client} has 2 CPUs"):
        launch(run, 3, 0, client_session.client, tmp_path / "launch",
               on_event=lambda kind, content: seen.append(kind))
    assert seen == [] and not (tmp_path / "ddp").exists()


def test_two_workers_match_one_process_then_cancel_with_a_checkpoint(client_session: Cluster, tmp_path: Path,
                                                                    tiny_model_dir: Path) -> None:
    run = json.loads(write_run(tmp_path, tiny_model_dir, settings(tmp_path / "ddp", max_steps=400)).read_text())
    del run["events"]
    seen, cancel, on_event = recording_cancel()
    # Through the Ray Client session: the queue and the stop flag are actors, so events and cancel cross it too.
    result = launch(run, 2, 0, client_session.client, tmp_path / "launch", on_event=on_event, cancel=cancel)
    assert_two_ranks_match_one_process_then_cancel(result, seen, tmp_path, tiny_model_dir)
