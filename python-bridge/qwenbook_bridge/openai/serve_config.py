"""What a server is asked to do: ServeConfig (port, names, batch, memory, adapters) and the request limits it
gives the routes (ApiLimits), checked without torch or the model.

`qwenbook serve` (openai/cli.py) validates its options here before it imports the engine, so a bad option is
refused in well under a second rather than after torch's import and the model's load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenbook_bridge.engine.errors import InvalidOptionError
from qwenbook_bridge.engine.models.adapters import AdapterError, read_adapter_config

# Requests that may wait per batch slot when max_queue is not given: at 32 rows, 128 waiting requests are
# about four batches' worth, so a queued request starts within a few replies' time instead of minutes.
QUEUE_PER_BATCH_SLOT = 4
# The engine's adapter slots are sized for the largest rank served, rounded up to this: one slot layout then fits
# the usual ranks (8, 16, 32, 64) without a rank-4 adapter making the tables any smaller than rank 8's.
LORA_RANK_MULTIPLE = 8

MiB = 1024 * 1024


@dataclass(frozen=True)
class ApiLimits:
    """What one request may ask of the server (ServeConfig fills these in)."""

    # Request bodies larger than this get 413. 4 MiB holds the longest prompt a Qwen context takes (128k tokens
    # as token ids or as JSON-escaped CJK text is 1-2 MiB) with room to spare, while 256 clients sending a
    # full body each still stay near 1 GiB of memory.
    max_body_bytes: int = 4 * MiB
    # Requests allowed to wait for a place in the batch; one more gets 429.
    max_queue: int = 128
    # Retry-After on a 429, in seconds; None: estimated from how long recent requests took.
    retry_after_s: int | None = None
    # Seconds a client may take to send its request body (and, in serving.py, its headers or to read a stream).
    client_timeout_s: float = 30.0


@dataclass(frozen=True)
class ServeConfig:
    port: int = 8000  # 0 picks a free port (ServeStats.port tells which)
    # Loopback only by default: the API has no key unless one is set, so it must not face a network by accident.
    host: str = "127.0.0.1"
    api_key: str | None = None  # when set, every request needs 'Authorization: Bearer <api_key>'
    model_name: str = "qwen"  # the id clients pass as `model` and /v1/models lists
    aliases: tuple[str, ...] = ()  # other ids accepted as `model` (e.g. the hub id or folder path)
    max_batch_size: int = 32  # requests decoded together; more wait in a queue
    context_length: int | None = None  # None: the model config's max_position_embeddings
    # Share of the device's memory the model and its key/value cache may use (vLLM's gpu_memory_utilization;
    # on the CPU, of the free RAM); the cache gets what the weights leave of it.
    memory_utilization: float = 0.9
    # How long stop() lets open connections finish before closing them (streams are cancelled first).
    shutdown_timeout_s: float = 5.0
    # Requests that may wait for a place in the batch; one more gets 429. None: 4 per batch row.
    max_queue: int | None = None
    max_body_bytes: int = 4 * MiB  # larger request bodies get 413 (serving_app.ApiLimits says why 4 MiB)
    retry_after_s: int | None = None  # Retry-After on a 429; None: estimated from recent request times
    # Seconds a client may take to send its headers or its body, or leave a stream unread, before it is
    # disconnected (a stream's generation is then cancelled).
    client_timeout_s: float = 30.0
    # LoRA adapters served beside the base model: name -> peft folder (adapter_config.json +
    # adapter_model.safetensors). A request whose "model" is the name decodes through that adapter.
    adapters: Mapping[str, str | Path] = field(default_factory=dict)

    @property
    def queue_limit(self) -> int:
        return self.max_queue if self.max_queue is not None else QUEUE_PER_BATCH_SLOT * self.max_batch_size

    def limits(self) -> ApiLimits:
        return ApiLimits(max_body_bytes=self.max_body_bytes, max_queue=self.queue_limit,
                         retry_after_s=self.retry_after_s, client_timeout_s=self.client_timeout_s)

    def validate(self) -> ServeConfig:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise InvalidOptionError(f"port must be an integer from 0 to 65535, got {self.port!r}")
        if not isinstance(self.host, str) or not self.host.strip():
            raise InvalidOptionError(f"host must be a host name or IP address, got {self.host!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()
                                         or any(c.isspace() for c in self.api_key)):
            raise InvalidOptionError("apiKey must be a non-empty string without spaces")
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise InvalidOptionError(f"name must be a non-empty string, got {self.model_name!r}")
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int) \
                or self.max_batch_size < 1:
            raise InvalidOptionError(f"maxBatchSize must be a positive integer, got {self.max_batch_size!r}")
        _check_int("maxQueue", self.max_queue, 0, 1_000_000, optional=True,
                   hint="0 turns away every request that cannot join the batch at once")
        _check_int("maxBody", self.max_body_bytes, 1024, 1024 * MiB, hint="bytes, e.g. 4194304 for 4 MiB")
        _check_int("retryAfter", self.retry_after_s, 1, 3600, optional=True, hint="seconds")
        u = self.memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise InvalidOptionError(f"memoryUtilization must be a fraction in (0, 1], e.g. 0.9, got {u!r}")
        t = self.client_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.1 <= t <= 3600:
            raise InvalidOptionError(f"clientTimeout must be a number of seconds from 0.1 to 3600, got {t!r}")
        self.adapter_ranks()
        return self

    def adapter_ranks(self) -> dict[str, int]:
        """Each adapter's LoRA rank (adapter_config.json `r`), after checking the names and folders: names are
        non-empty, differ from the base model's name and aliases, and each folder is a peft adapter."""
        if not isinstance(self.adapters, Mapping):
            raise InvalidOptionError(f"adapters must map a name to an adapter folder, got {self.adapters!r}")
        taken = {self.model_name: "the base model's name", **{a: "an alias of the base model" for a in self.aliases}}
        ranks: dict[str, int] = {}
        for name, folder in self.adapters.items():
            if not isinstance(name, str) or not name.strip() or name != name.strip():
                raise InvalidOptionError(f"an adapter name must be a non-empty string without surrounding spaces, "
                                         f"got {name!r}")
            if name in taken:
                raise InvalidOptionError(f"adapter name {name!r} is already {taken[name]}: clients could not ask for "
                                         "one or the other; give the adapter another name (name=DIR)")
            if not isinstance(folder, (str, Path)) or not str(folder):
                raise InvalidOptionError(f"adapter {name!r} needs a folder path, got {folder!r}")
            try:
                config = read_adapter_config(folder)
            except AdapterError as exc:
                raise InvalidOptionError(f"adapter {name!r}: {exc}") from None
            rank = config.get("r")
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise InvalidOptionError(f"adapter {name!r}: {Path(folder) / 'adapter_config.json'} has no LoRA rank "
                                         f"(a positive integer `r`), got {rank!r}; is it a LoRA adapter?")
            ranks[name] = rank
        return ranks

    @property
    def max_lora_rank(self) -> int:
        """The engine's slot rank: the largest adapter rank, rounded up to a multiple of LORA_RANK_MULTIPLE."""
        top = max(self.adapter_ranks().values(), default=1)
        return -(-top // LORA_RANK_MULTIPLE) * LORA_RANK_MULTIPLE


def _check_int(name: str, value: Any, lo: int, hi: int, optional: bool = False, hint: str = "") -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidOptionError(f"{name} must be an integer from {lo} to {hi}{f' ({hint})' if hint else ''}, "
                                 f"got {value!r}")
