"""A real worker subprocess and a minimal DEALER/SUB client for it, checking every message against the schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import zmq

from qwenbook_bridge.protocol import Message, Signer, make_message, parse, serialize, validate_message

TIMEOUT_S = 120  # generous: only there so a broken worker fails the test instead of hanging it


class WorkerProcess:
    def __init__(self, folder: Path, args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.runtime_file = folder / "runtime" / "qwenbook-worker.json"
        self.log_file = folder / "runtime" / "qwenbook-worker.log"
        self.output = folder / "worker-output.txt"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qwenbook_bridge.worker", "--runtime-file", str(self.runtime_file),
                 "--device", "cpu", *(args or [])],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.info = self._wait_for_runtime_file()

    def _wait_for_runtime_file(self) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}: {self.output.read_text()}")
            if self.runtime_file.exists():
                return json.loads(self.runtime_file.read_text())
            time.sleep(0.05)
        raise TimeoutError(f"no runtime file after {TIMEOUT_S} s: {self.output.read_text()}")

    def log(self) -> str:
        return self.log_file.read_text(encoding="utf-8")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Client:
    """One DEALER (requests, replies, events) and one SUB (telemetry), like the TypeScript client."""

    def __init__(self, info: dict[str, Any], key: str | None = None) -> None:
        self.signer = Signer(info["key"])
        self.send_signer = Signer(key or info["key"])
        self.session = str(uuid.uuid4())
        self.ctx = zmq.Context()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(info["router_endpoint"])
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.subscribe(b"")
        self.sub.connect(info["pub_endpoint"])

    def send(self, msg_type: str, content: dict[str, Any], signer: Signer | None = None) -> Message:
        msg = make_message(msg_type, content, self.session)
        self.dealer.send_multipart(serialize(msg, signer or self.send_signer))
        return msg

    def recv(self) -> Message:
        if not self.dealer.poll(TIMEOUT_S * 1000):
            raise TimeoutError(f"no message from the worker in {TIMEOUT_S} s")
        msg = parse(self.dealer.recv_multipart(), self.signer)
        validate_message(msg)
        return msg

    def call(self, msg_type: str, content: dict[str, Any]) -> tuple[Message, list[Message]]:
        """Send a request; return its reply and the events that came before it."""
        request = self.send(msg_type, content)
        events = []
        while True:
            msg = self.recv()
            assert msg.parent_header["msg_id"] == request.msg_id, "a message for another request arrived"
            if msg.msg_type == f"{msg_type}_reply":
                return msg, events
            events.append(msg)

    def broadcasts(self, until_type: str, until: dict[str, Any] | None = None) -> list[Message]:
        """Telemetry received so far, up to and including the first `until_type` whose content has `until`."""
        seen = []
        while True:
            if not self.sub.poll(TIMEOUT_S * 1000):
                raise TimeoutError(f"no {until_type} broadcast in {TIMEOUT_S} s; got {[m.msg_type for m in seen]}")
            topic, *frames = self.sub.recv_multipart()
            msg = parse(frames, self.signer)
            validate_message(msg)
            assert topic.decode() == msg.msg_type and msg.parent_header == {}
            seen.append(msg)
            if msg.msg_type == until_type and all(msg.content.get(k) == v for k, v in (until or {}).items()):
                return seen

    def drain_broadcasts(self) -> None:
        while self.sub.poll(0):
            self.sub.recv_multipart()

    def close(self) -> None:
        self.ctx.destroy(linger=0)
