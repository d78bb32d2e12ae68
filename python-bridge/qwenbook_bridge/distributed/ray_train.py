"""Running a data-parallel run (dist_train.run_rank) on the workers of a Ray cluster with Ray Train.

The same contract as dist_launch.launch, across hosts: rank 0's events are relayed as they happen, cancel stops
every rank at one step boundary with a checkpoint, and a failed run raises DistributedRunError with the ranks'
own words. Events travel on a Ray queue (an actor, so it works from any host) and cancel on a small flag actor
that each rank polls; Ray Train's TorchTrainer has already joined the ranks' process group (gloo on CPU
workers, nccl with GPUs) when run_rank starts.

Every worker runs this package's code, so it must be installed on every node (`pip install qwenbook-bridge[ray]`),
and train.output_dir must be one folder every node sees (a shared filesystem): rank 0 writes the checkpoints and
every rank reads a checkpoint to resume.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from qwenbook_bridge.engine.errors import DeviceUnavailableError, EngineError, InvalidOptionError

if TYPE_CHECKING:
    from qwenbook_bridge.distributed.torchrun import EventSink

# rank.py and torchrun.py (torch, transformers) are imported where they are used: every Ray worker that runs one of
# this module's tasks or actors imports the module, and only the training workers need torch.

log = logging.getLogger("qwenbook.worker")

_CPUS_PER_WORKER = 1
_CLIENT_START_TRIES = 3  # fresh Ray Client connections when the head's per-connection server dies starting
_POLL_S = 0.2


class RayClusterError(EngineError):
    """The Ray cluster cannot be reached, or cannot run the run as asked (e.g. its nodes do not share storage)."""


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise InvalidOptionError("Ray is not installed in this worker's environment; install it with "
                                 "`pip install 'qwenbook-bridge[ray]'` (ray[train,client]==2.58.0)") from e
    return ray


class _StopFlag:
    """Set by the driver when the run is cancelled; every rank polls it."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


def _watch_stop(stop: Any, cancel: threading.Event, done: threading.Event) -> None:
    import ray

    while not done.wait(_POLL_S):
        try:
            flagged = ray.get(stop.is_set.remote())
        except Exception:  # noqa: BLE001 - the flag's owner (the driver) is gone: stop with a checkpoint
            flagged = True
        if flagged:
            cancel.set()
            return


def _rank_main(config: dict[str, Any]) -> None:
    """One Ray Train worker: the run's rank in the group TorchTrainer joined."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    events, stop = config["events"], config["stop"]
    cancel, done = threading.Event(), threading.Event()
    threading.Thread(target=_watch_stop, args=(stop, cancel, done), daemon=True).start()

    def tell(item: tuple[Any, ...]) -> None:
        try:
            events.put(item)
        except ray.exceptions.RayError:  # the driver is gone (its stop flag is too, so the run stops and saves)
            pass

    def emit(kind: str, content: dict[str, Any]) -> None:
        tell(("event", kind, {**content, "world_size": world} if kind == "train_begin" else content))

    try:
        from qwenbook_bridge.distributed import rank as dist_train

        spec = dist_train.DistRun.from_dict(config["run"], "the run")
        result = dist_train.run_rank(spec, rank, world, ray.train.torch.get_device(),
                                     emit if rank == 0 else (lambda kind, content: None), cancel)
        if rank == 0:
            tell(("result", result))
    except Exception as e:
        said = f"{type(e).__name__}: {e}" if isinstance(e, EngineError) else \
            f"training stopped: {type(e).__name__}: {e}"
        tell(("error", rank, f"rank {rank}: {said}"))
        raise
    finally:
        done.set()
        tell(("done", rank))


def _resolve_address(address: str | None) -> str:
    chosen = address or os.environ.get("RAY_ADDRESS")
    if not chosen:
        raise InvalidOptionError("no Ray cluster given: pass an address (ray://host:10001 for Ray Client, "
                                 "host:6379 for the head node) or set RAY_ADDRESS")
    return chosen


def _host_port(address: str) -> tuple[str, int] | None:
    """The host and port to probe, or None for addresses Ray resolves itself ("auto", "local")."""
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        return (parts.hostname, parts.port) if parts.hostname and parts.port else None
    except ValueError as e:
        raise InvalidOptionError(f"the Ray address {address!r} has a bad port ({e}); "
                                 "write it as host:6379 or ray://host:10001") from e


def _connect(ray: Any, address: str, timeout_s: float) -> None:
    """ray.init, bounded: a cluster that does not answer raises instead of hanging the caller."""
    target = _host_port(address)
    advice = "check the address and that the cluster is up (`ray status` on its head node)"
    if target is not None:
        try:
            socket.create_connection(target, timeout=timeout_s).close()
        except OSError as e:
            raise RayClusterError(f"cannot reach the Ray cluster at {address}: {e}; {advice}") from e
    failure: list[BaseException] = []

    def init() -> None:
        # Ray Client's head starts one server process per connection; on a loaded head that process can die
        # while starting ("Initialization failure from server"), and a new connection starts a fresh one. So
        # that failure is retried within the caller's time bound; any other failure is final at once.
        for attempt in range(1, _CLIENT_START_TRIES + 1):
            try:
                ray.init(address=address, log_to_driver=False, logging_level="WARNING")
                return
            except ConnectionAbortedError as e:
                if attempt == _CLIENT_START_TRIES or not _is_client_start_failure(e):
                    failure.append(e)
                    return
                log.warning("the Ray Client server at %s failed to start a server for this connection "
                            "(try %d of %d): %s", address, attempt, _CLIENT_START_TRIES, e)
            except BaseException as e:  # noqa: BLE001 - reported by the caller's thread
                failure.append(e)
                return

    # ray.init can wait a long time on a port that accepts but never answers; the thread is left behind then.
    thread = threading.Thread(target=init, daemon=True, name="ray-init")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RayClusterError(f"the Ray cluster at {address} did not answer within {timeout_s:g} s; {advice}")
    if failure:
        raise RayClusterError(f"cannot connect to the Ray cluster at {address}: {failure[0]}; {advice}") \
            from failure[0]


def _is_client_start_failure(e: BaseException) -> bool:
    """Ray Client's proxy could not start (or reach) the per-connection server: worth a fresh connection. A server
    that died at once is a zombie by the time the proxy reads its command line, which raises there instead."""
    said = str(e)
    died_starting = "start_specific_server" in said and ("ZombieProcess" in said or "NoSuchProcess" in said)
    return "Initialization failure from server" in said and (
        "Starting Ray client server failed" in said or "Proxy failed to Connect to backend" in said or died_starting)


def _check_resources(ray: Any, address: str, workers: int, gpus_per_worker: float) -> None:
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0), have.get("GPU", 0)
    need_cpus, need_gpus = workers * _CPUS_PER_WORKER, workers * gpus_per_worker
    if need_cpus > cpus or need_gpus > gpus:
        raise DeviceUnavailableError(
            f"the run asks for {workers} workers × ({_CPUS_PER_WORKER} CPU, {gpus_per_worker:g} GPU) = "
            f"{need_cpus} CPUs and {need_gpus:g} GPUs, but the Ray cluster at {address} has {cpus:g} CPUs and "
            f"{gpus:g} GPUs in all; ask for fewer workers or GPUs per worker, or add nodes")


def _write_probe(folder: str, name: str) -> str | None:
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_text("qwenbook storage probe\n", encoding="utf-8")
    except OSError as e:
        return f"cannot write there: {e}"
    return None


def _missing_probes(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if not (Path(folder) / n).is_file()]


def _remove_probe(folder: str, name: str) -> None:
    try:
        (Path(folder) / name).unlink(missing_ok=True)
    except OSError:  # a folder it could not write in the first place; that error is the one to report
        pass


def _check_shared_folder(ray: Any, folder: str, gpus_per_worker: float) -> None:
    """Every node that could host a rank writes a file in `folder` and sees every other node's file."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= _CPUS_PER_WORKER
             and n["Resources"].get("GPU", 0) >= gpus_per_worker]
    token = uuid.uuid4().hex[:8]
    names = {n["NodeID"]: f".qwenbook-ray-probe-{token}-{n['NodeID'][:12]}" for n in nodes}
    where = {n["NodeID"]: f"node {n['NodeManagerAddress']} ({n['NodeID'][:12]})" for n in nodes}

    def on_each(fn: Callable[..., Any], arg: Callable[[str], Any]) -> dict[str, Any]:
        task = ray.remote(fn)
        refs = {node: task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(folder, arg(node)) for node in names}
        return dict(zip(refs, ray.get(list(refs.values()))))

    shared = "train.output_dir must be one folder every Ray node can write (a shared filesystem) at that path"
    everyone = sorted(names.values())
    try:
        for node, error in on_each(_write_probe, names.__getitem__).items():
            if error:
                raise RayClusterError(f"{where[node]} cannot use the run's output folder {folder}: {error}; {shared}")
        for node, missing in on_each(_missing_probes, lambda node: everyone).items():
            if missing:
                writers = [where[n] for n, name in names.items() if name in missing]
                raise RayClusterError(f"{where[node]} does not see the files {', '.join(writers)} wrote in {folder}; "
                                      f"{shared}")
    finally:
        on_each(_remove_probe, names.__getitem__)


def _check_arguments(run: dict[str, Any], workers: int, gpus_per_worker: float) -> str:
    """Validates what can be checked without a cluster; returns the run's output folder."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidOptionError(f"workers must be a whole number of ranks (1 or more), got {workers!r}")
    if isinstance(gpus_per_worker, bool) or not isinstance(gpus_per_worker, int | float) or gpus_per_worker < 0:
        raise InvalidOptionError(f"gpus_per_worker must be 0 (CPU workers) or more, got {gpus_per_worker!r}")
    if "events" in run:
        raise InvalidOptionError("leave 'events' out of a Ray run: rank 0's events come back through on_event")
    from qwenbook_bridge.distributed import rank as dist_train

    spec = dist_train.DistRun.from_dict(run, "the run")
    out = Path(spec.config.output_dir)
    if not out.is_absolute():
        raise InvalidOptionError(f"train.output_dir must be an absolute path when ranks run on Ray workers "
                                 f"(a relative one lands in each worker's own folder), got {str(out)!r}")
    return str(out)


def _run_trainer(run: dict[str, Any], workers: int, gpus_per_worker: float, storage: str, events: Any,
                 stop: Any) -> str | None:
    """TorchTrainer.fit, in a Ray task; returns what failed, or None."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": _CPUS_PER_WORKER, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    trainer = TorchTrainer(
        _rank_main, train_loop_config={"run": run, "events": events, "stop": stop},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"qwenbook-{uuid.uuid4().hex[:8]}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=0)))
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - the driver reports it with the ranks' own words
        return f"{type(e).__name__}: {e}"
    return None


def _fit(ray: Any, run: dict[str, Any], workers: int, gpus_per_worker: float, storage: str,
         on_event: EventSink, cancel: threading.Event | None) -> dict[str, Any]:
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    events = Queue(actor_options={"num_cpus": 0})
    stop = ray.remote(num_cpus=0)(_StopFlag).remote()
    # fit() runs in a task, not on a driver thread: the driver returns once every rank is done, without
    # waiting on Ray Train's own teardown (its placement-group cleaner can wait 10 s on the state API when the
    # cluster has no dashboard), and ray.shutdown() must not run while a thread of this process is in a Ray call.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    fitting = ray.remote(_run_trainer).options(num_cpus=0, max_retries=0, scheduling_strategy=here) \
        .remote(run, workers, gpus_per_worker, storage, events, stop)
    result: dict[str, Any] | None = None
    said: list[str] = []
    finished: set[int] = set()

    def take(item: tuple[Any, ...]) -> None:
        nonlocal result
        if item[0] == "event":
            on_event(item[1], item[2])
        elif item[0] == "result":
            result = item[1]
        elif item[0] == "error":
            said.append(item[2])
        else:
            finished.add(item[1])

    stopping, failure = False, None
    try:
        # Every rank's last message is "done"; a rank that dies without one ends fit() instead.
        while len(finished) < workers:
            ended, _ = ray.wait([fitting], timeout=0)
            if ended:
                failure = ray.get(fitting)
                break
            if cancel is not None and cancel.is_set() and not stopping:
                ray.get(stop.set.remote())
                stopping = True
            try:
                take(events.get(timeout=_POLL_S))
            except Empty:
                pass
        while not events.empty():  # a rank's puts return only once queued, so this is all of them
            take(events.get_nowait())
    finally:
        for actor in (stop, events.actor):
            ray.kill(actor)
    if result is not None and len(finished) == workers and not said:
        return result
    detail = "; ".join(dict.fromkeys(said)) or failure or "rank 0 sent no result"
    from qwenbook_bridge.distributed.torchrun import DistributedRunError

    raise DistributedRunError(f"the {workers}-rank Ray Train run failed: {detail}")


def launch(run: dict[str, Any], workers: int, gpus_per_worker: float, address: str | None, workdir: Path,
           on_event: EventSink | None = None, cancel: threading.Event | None = None,
           storage_path: str | None = None, connect_timeout_s: float = 15) -> dict[str, Any]:
    """Run `run` (dist_train's run file, without "events") on `workers` Ray Train workers; returns rank 0's
    TrainResult dict. An already connected Ray session is used as it is; otherwise this connects to `address`
    (or RAY_ADDRESS) and disconnects at the end."""
    folder = _check_arguments(run, workers, gpus_per_worker)
    ray = _import_ray()
    workdir.mkdir(parents=True, exist_ok=True)
    connected_here = not ray.is_initialized()
    shown = address or "the current Ray session"
    if connected_here:
        shown = _resolve_address(address)
        _connect(ray, shown, connect_timeout_s)
    try:
        _check_resources(ray, shown, workers, gpus_per_worker)
        _check_shared_folder(ray, folder, gpus_per_worker)
        return _fit(ray, run, workers, gpus_per_worker, storage_path or str(workdir.resolve()),
                    on_event or (lambda kind, content: None), cancel)
    finally:
        if connected_here:
            ray.shutdown()
