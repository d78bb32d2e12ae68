"""Which thread runs a job: long jobs alone, the rest of their model's work held back in order until they end."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

from qwenbook_bridge.worker.job_lanes import JobLanes, ModelFree


@dataclass
class Job:
    name: str
    msg_type: str
    model_id: str | None
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def request(self):
        content = {} if self.model_id is None else {"model_id": self.model_id}
        return SimpleNamespace(msg_type=self.msg_type, content=content)


class Push:
    def send_multipart(self, frames):
        pass

    def close(self):
        pass


def make_lanes():
    ran: list[tuple[str, str]] = []
    freed: queue.Queue[ModelFree] = queue.Queue()

    def run_job(job: Job, _push) -> None:
        if job.msg_type == "train":
            assert job.release.wait(10), "the test never let the long job finish"
        ran.append((job.name, threading.current_thread().name))

    return JobLanes(run_job, Push, frozenset({"train"}), freed.put), ran, freed


def test_long_jobs_run_alone_and_their_models_work_waits_in_order():
    lanes, ran, freed = make_lanes()
    push = Push()
    train = Job("train-a", "train", "a")
    lanes.dispatch(train, push)
    for job in (Job("chat-a1", "generate", "a"), Job("chat-b", "generate", "b"), Job("load", "load", None),
                Job("chat-a2", "generate", "a")):
        lanes.dispatch(job, push)
    # Work on other models (and with no model) ran at once on this thread; model a's chats wait.
    assert [name for name, _ in ran] == ["chat-b", "load"]
    assert {thread for _, thread in ran} == {threading.current_thread().name}

    train.release.set()
    lanes.release(freed.get(timeout=10), push)
    assert [name for name, _ in ran] == ["chat-b", "load", "train-a", "chat-a1", "chat-a2"]
    assert ran[2][1] == "qwenbook-train"


def test_a_waiting_long_job_makes_the_rest_wait_again():
    lanes, ran, freed = make_lanes()
    push = Push()
    first, second = Job("train-1", "train", "a"), Job("train-2", "train", "a")
    lanes.dispatch(first, push)
    lanes.dispatch(second, push)
    lanes.dispatch(Job("chat", "generate", "a"), push)
    first.release.set()
    lanes.release(freed.get(timeout=10), push)
    assert [name for name, _ in ran] == ["train-1"]  # the second run started; the chat waits for it
    second.release.set()
    lanes.release(freed.get(timeout=10), push)
    assert [name for name, _ in ran] == ["train-1", "train-2", "chat"]


def test_stopping_waits_for_long_jobs_then_answers_what_waited():
    lanes, ran, _ = make_lanes()
    push = Push()
    train = Job("train", "train", "a")
    lanes.dispatch(train, push)
    lanes.dispatch(Job("chat", "generate", "a"), push)
    threading.Timer(0.05, train.release.set).start()  # the run notices the cancel and ends
    lanes.finish(push, grace_s=10)
    assert [name for name, _ in ran] == ["train", "chat"]
