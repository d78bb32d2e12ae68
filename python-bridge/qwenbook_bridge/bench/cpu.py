"""CPU chat benchmark: a notebook's chat on the CPU with fp32, int8 and int4 weights, beside llama.cpp on our own
q8_0 GGUF export of the same model, at each thread count.

    cd python-bridge && PYTHONPATH=. python -m qwenbook_bridge.bench.cpu --out cpu.json     # several minutes
    python -m qwenbook_bridge.bench.cpu --small                 # the tiny model and a few tokens: seconds

Without `--model` it writes the Qwen2.5-0.5B shape (Binder's default model) with random weights and the real Qwen
tokenizer (`--tokenizer`, default $QWENBOOK_TINY_MODEL's) to a temporary folder. Each PyTorch row loads that folder
as `qwen.load` does (fp32 on the CPU; int8/int4 layers as its quant option makes them) and answers one chat through
`engine.generate.generation.generate` on the decode path the worker picks for it (the model's chat engine when it
takes the model, else the engine's own loop), greedy, a fixed number of new tokens; decode tokens/s and time to
first token are the reply's own figures (GenerationResult), median of `--runs` after a warm-up, each run with the
engine's prefix cache emptied, so every first token pays the whole prefill. The llama.cpp row runs the GGUF
through node-llama-cpp (bench/llama_cpp.mjs) on the same prompt ids with the same thread count, timed the same way.

The PyTorch rows of each thread count run in a process of their own with torch.set_num_threads and
OMP_NUM_THREADS set to that count (each row loading the folder afresh), so no thread setting leaks from one count
to the next. The JSON is saved after
every row; a failed row is recorded under `errors` and the others still run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
LLAMA_RUNNER = HERE / "llama_cpp.mjs"
WEIGHTS = ("fp32", "int8", "int4")
# The chat engine a row runs on (QWENBOOK_CPU_ENGINE): the paged engine in PyTorch, or llama.cpp on a GGUF copy of
# the same loaded weights (engine/llama_cpp), the worker's default on a CPU.
ENGINES = ("pytorch", "llama.cpp")
# A short first question under the template's default system prompt: 39 prompt tokens with Qwen2.5's template.
MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]

@dataclass
class Report:
    meta: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    profiles: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)


def all_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def thread_counts(spec: str) -> list[int]:
    """'1,2,all' -> [1, 2, <cores>], without repeats, in order."""
    counts: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        n = all_cores() if part == "all" else int(part)
        if n < 1:
            raise ValueError(f"thread counts must be at least 1, got {part}")
        if n not in counts:
            counts.append(n)
    return counts


def write_random_model(shape: str, tokenizer: Path, into: Path) -> Path:
    """A random-weight model of `shape` (bench/model.py) saved with the tokenizer's files: a folder `qwen.load`
    reads like a downloaded one."""
    from qwenbook_bridge.bench.model import build_random_model, copy_tokenizer

    torch.manual_seed(0)
    model = build_random_model(shape, torch.device("cpu"), torch.float32)
    model.save_pretrained(into)
    del model
    return copy_tokenizer(tokenizer, into)


def export_q8_0(folder: Path, target: Path) -> dict[str, Any]:
    """The folder's model as a q8_0 GGUF, written by the engine's own exporter (as `m.export({format: "gguf"})`)."""
    from qwenbook_bridge.engine import LoadOptions, load_model
    from qwenbook_bridge.engine.export.gguf import GgufConfig, export_gguf

    started = time.perf_counter()
    loaded = load_model(str(folder), LoadOptions(dtype="fp32", device="cpu", local_files_only=True))
    export_gguf(loaded.model, loaded.tokenizer, target, GgufConfig(type="q8_0"), evaluate=False)
    return {"gguf_bytes": target.stat().st_size, "export_s": round(time.perf_counter() - started, 1)}


# ---- one PyTorch row, in its own process ------------------------------------------------------------------------


def quant_spec(weights: str, hidden: int) -> dict[str, Any] | None:
    if weights == "fp32":
        return None
    # qwen.load's default group of 128 where the model's widths allow it (the tiny test model's are 64).
    return {"method": weights, "group_size": 128 if hidden % 128 == 0 else 32}


def torch_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Loads the folder with the row's weights and times one chat the way the worker runs it."""
    from qwenbook_bridge.engine import LoadOptions, SamplingParams, load_model
    from qwenbook_bridge.engine.generate.chat_engine import ChatEngines
    from qwenbook_bridge.engine.generate.generation import generate, prompt_ids
    from qwenbook_bridge.engine.models.adapter_registry import AdapterRegistry
    from qwenbook_bridge.engine.quant.config import QuantConfig
    from qwenbook_bridge.engine.quant.quantize import quantize_model

    os.environ["QWENBOOK_CPU_ENGINE"] = spec["engine"]
    started = time.perf_counter()
    loaded = load_model(spec["folder"], LoadOptions(dtype="fp32", device="cpu", local_files_only=True))
    quant = quant_spec(spec["weights"], loaded.model.config.hidden_size)
    if quant is not None:
        # The layers `qwen.load(..., {quant})` makes (at_load.quantize_loaded runs this same call), without the
        # load's before/after quality measurement on held-out text, which would double a row's set-up time.
        with torch.no_grad():
            quantize_model(loaded.model, QuantConfig(**quant), tokenizer=loaded.tokenizer)
    load_s = time.perf_counter() - started
    # As handlers/dispatch.py: the model's chat engine when it takes the model, else generate's own loops.
    engines = ChatEngines(AdapterRegistry())
    started = time.perf_counter()
    lease = engines.lease(loaded)  # the llama.cpp engine writes its GGUF copy here, once per weights
    engine_s = time.perf_counter() - started
    engine = lease.engine if lease is not None else None
    kind = "llama.cpp" if type(engine).__name__ == "LlamaCppEngine" else "pytorch"
    if kind != spec["engine"]:
        raise RuntimeError(f"the row asked for the {spec['engine']} engine but the worker's choice gave {kind}")
    prefix_hits = 0

    def reply(max_tokens: int) -> Any:
        nonlocal prefix_hits
        if engine is not None:
            with engine.exclusive():  # parking the engine empties its prefix cache: the prompt is prefilled whole
                pass
            before = engine.stats().prefix_hit_tokens
        # ignore_eos: every reply has the same length whatever a random model's argmax picks.
        result = generate(loaded, MESSAGES, SamplingParams(max_tokens=max_tokens, greedy=True, ignore_eos=True),
                          on_token=lambda _delta: None, engine=engine)
        if engine is not None:
            prefix_hits += engine.stats().prefix_hit_tokens - before
        return result

    try:
        reply(min(8, spec["new_tokens"]))  # warm-up: the engine's first steps, the allocator, lazy kernel set-up
        results = [reply(spec["new_tokens"]) for _ in range(spec["runs"])]
        # The prefill's PyTorch ops: only the PyTorch engine's rows compute through them.
        profile = prefill_profile(loaded, spec) if spec.get("profile") and kind == "pytorch" else None
    finally:
        if lease is not None:
            lease.release()
        engines.close()
    return {
        "threads": spec["threads"], "weights": spec["weights"], "engine": kind,
        "path": f"qwenbook {spec['weights']}" + (" llama.cpp" if kind == "llama.cpp" else ""),
        "loop": ("llama.cpp engine" if kind == "llama.cpp" else "chat engine") if engine is not None
        else "generate loop", "engine_start_s": round(engine_s, 2),
        "decode_tokens_per_s": statistics.median(r.tokens_per_s for r in results),
        "ttft_ms": statistics.median(r.ttft_ms for r in results),
        "runs_tokens_per_s": [r.tokens_per_s for r in results], "runs_ttft_ms": [r.ttft_ms for r in results],
        "prompt_tokens": results[0].prompt_tokens, "completion_tokens": [r.completion_tokens for r in results],
        "prompt_ids": prompt_ids(loaded, MESSAGES), "tokens": results[-1].token_ids,
        "prefix_hit_tokens": prefix_hits,
        # What the row's decode reads: the GGUF copy on llama.cpp, the model's tensors on PyTorch.
        "weight_bytes": engine.gguf.stat().st_size if kind == "llama.cpp" else weight_bytes(loaded.model),
        "load_s": round(load_s, 2),
        "torch_threads": torch.get_num_threads(),
        **({"prefill_profile": profile} if profile is not None else {}),
    }


def weight_bytes(model: Any) -> int:
    """Bytes of every tensor the model holds once (parameters and buffers; tied and packed weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def prefill_profile(loaded: Any, spec: dict[str, Any], top: int = 8) -> dict[str, Any]:
    """Where one prefill of the prompt spends its time: the model's forward over the prompt (the same linear layers
    and kernels the chat engine calls) under torch.profiler, the ops with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    from qwenbook_bridge.engine.generate.generation import prompt_ids

    ids = torch.tensor([prompt_ids(loaded, MESSAGES)])
    walls = []
    with torch.inference_mode():
        for _ in range(3):  # the first is a warm-up too
            started = time.perf_counter()
            loaded.model(input_ids=ids, logits_to_keep=1)
            walls.append(time.perf_counter() - started)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loaded.model(input_ids=ids, logits_to_keep=1)
    wall = min(walls[1:])
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return {"weights": spec["weights"], "threads": spec["threads"], "prompt_tokens": int(ids.shape[1]),
            "forward_ms": round(1000 * wall, 1),
            "top_ops": [{"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1000, 2),
                         "share": round(e.self_cpu_time_total / total, 3)} for e in events[:top]]}


# ---- the parent: rows in subprocesses, the table ----------------------------------------------------------------


def torch_rows(spec: dict[str, Any]) -> None:
    """Every weights row of one thread count, one JSON line each on stdout ({"row": ...} or {"error": ...}), so a
    row that fails leaves the others to run."""
    torch.set_num_threads(spec["threads"])
    for engine in spec["engines"]:
        for weights in spec["weights"]:
            try:
                line: dict[str, Any] = {"row": torch_row({**spec, "weights": weights, "engine": engine})}
            except Exception as e:  # noqa: BLE001 - reported to the parent, which records it in the JSON
                line = {"error": f"{type(e).__name__}: {e}", "weights": f"{weights} {engine}",
                        "traceback": traceback.format_exc()}
            print(json.dumps(line), flush=True)
            gc.collect()  # the row's model and engine cache go before the next row loads its own


def run_torch_rows(spec: dict[str, Any], out: Path) -> Iterator[dict[str, Any]]:
    """The PyTorch rows of one thread count, from a process of their own whose OpenMP pool and torch setting have
    that many threads; yields each line of torch_rows as it comes."""
    package_root = str(HERE.parents[1])  # so `-m qwenbook_bridge...` resolves from any working directory
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(spec["threads"]),
           "MKL_NUM_THREADS": str(spec["threads"]),
           # The llama.cpp engine's GGUF copies go to this run's folder, written once per weights (the first row of
           # each, engine_start_s), not left in the user's cache.
           "QWENBOOK_GGUF_CACHE": spec["gguf_cache"]}
    # The worker's default copy (q8_0 for fp32 weights, q4_0 for int4), not an exact f32 one a test asks for. Only
    # the rows' environment changes: this process's is the caller's (a test session's).
    env.pop("QWENBOOK_CPU_GGUF_TYPE", None)
    spec_file = out.with_name(f"{out.name}.rows.json")
    spec_file.write_text(json.dumps(spec), encoding="utf-8")
    stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
    try:
        with subprocess.Popen([sys.executable, "-m", "qwenbook_bridge.bench.cpu", "--rows", str(spec_file)], env=env,
                              stdout=subprocess.PIPE, stderr=stderr, text=True) as proc:
            assert proc.stdout is not None
            seen = 0
            for raw in proc.stdout:
                if raw.startswith("{"):
                    seen += 1
                    yield json.loads(raw)
        if proc.returncode != 0 or seen < len(spec["weights"]) * len(spec["engines"]):
            stderr.seek(0)
            raise RuntimeError(f"the rows at {spec['threads']} thread(s) ended early (exit status {proc.returncode}):"
                               f"\n{stderr.read()[-3000:]}")
    finally:
        stderr.close()
        spec_file.unlink(missing_ok=True)


def run_llama_row(gguf: Path, prompt: list[int], threads: int, new_tokens: int, runs: int, out: Path) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None:
        raise FileNotFoundError("node is not on PATH: llama.cpp runs through node-llama-cpp (npm ci at the repo root)")
    spec_file = out.with_name(f"{out.name}.llama.json")
    spec_file.write_text(json.dumps({"model": str(gguf), "prompt": prompt, "threads": threads,
                                     "maxTokens": new_tokens, "runs": runs}), encoding="utf-8")
    try:
        done = subprocess.run([node, str(LLAMA_RUNNER), str(spec_file)], capture_output=True, text=True, cwd=HERE)
    finally:
        spec_file.unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp at {threads} thread(s) failed:\n{done.stderr[-3000:]}")
    got = json.loads(done.stdout)
    times = got["runs"]
    return {"threads": threads, "path": "llama.cpp q8_0", "weights": "q8_0", "loop": f"node-llama-cpp {got['version']}",
            "decode_tokens_per_s": statistics.median(r["tokens_per_s"] for r in times),
            "ttft_ms": statistics.median(r["ttft_ms"] for r in times),
            "runs_tokens_per_s": [r["tokens_per_s"] for r in times], "runs_ttft_ms": [r["ttft_ms"] for r in times],
            "prompt_tokens": len(prompt), "completion_tokens": [len(r["tokens"]) for r in times],
            "prompt_ids": prompt, "tokens": times[-1]["tokens"], "weight_bytes": gguf.stat().st_size,
            "load_s": got["load_s"], "llama_threads": got["threads"]}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def summarize(report: Report) -> str:
    meta = report.meta
    lines = [f"CPU: {meta['cpu']}, {meta['cores']} core(s)   torch {meta['torch']}   model: {meta['model']}",
             f"prompt: {meta.get('prompt_tokens', '?')} tokens, {meta['new_tokens']} new tokens greedy, median of "
             f"{meta['runs']} run(s) after a warm-up", "",
             f"{'threads':>7}  {'path':<26}{'decode tok/s':>13}{'first token ms':>16}{'decode vs fp32':>16}"
             f"{'first token vs fp32':>21}{'weights MB':>12}  loop",
             "(vs fp32: the row's speed over fp32's at the same threads; above 1.00x is faster)"]
    fp32 = {r["threads"]: r for r in report.rows if r["weights"] == "fp32" and r.get("engine") == "pytorch"}
    for r in report.rows:
        base = fp32.get(r["threads"])
        decode = ttft = ""
        if base is not None and r is not base:
            decode = f"{r['decode_tokens_per_s'] / max(base['decode_tokens_per_s'], 1e-9):.2f}x"
            ttft = f"{base['ttft_ms'] / max(r['ttft_ms'], 1e-9):.2f}x"
        lines.append(f"{r['threads']:>7}  {r['path']:<26}{r['decode_tokens_per_s']:>13.1f}{r['ttft_ms']:>16.0f}"
                     f"{decode:>16}{ttft:>21}{r['weight_bytes'] / 1e6:>12.0f}  {r['loop']}")
    for p in report.profiles:
        ops = ", ".join(f"{o['op']} {o['self_ms']:.0f} ms ({100 * o['share']:.0f}%)" for o in p["top_ops"][:4])
        lines.append(f"prefill {p['weights']} at {p['threads']} thread(s), {p['prompt_tokens']} tokens: forward "
                     f"{p['forward_ms']:.0f} ms; {ops}")
    lines += [f"ERROR {e['row']}: {e['error'].splitlines()[0]}" for e in report.errors]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwenbook_bridge.bench.cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a saved Qwen2/Qwen3 model folder (default: random Qwen2.5-0.5B shape)")
    p.add_argument("--tokenizer", help="a Qwen tokenizer folder for the random model (default: $QWENBOOK_TINY_MODEL)")
    p.add_argument("--small", action="store_true", help="the tiny test model ($QWENBOOK_TINY_MODEL or --tokenizer), "
                   "8 new tokens, 1 run, 1 thread: seconds, for tests")
    p.add_argument("--threads", help="comma list of thread counts, 'all' for every core (default 1,2,all)")
    p.add_argument("--weights", default=",".join(WEIGHTS), help="comma list of fp32, int8, int4 (default: all)")
    p.add_argument("--no-llama", action="store_true", help="skip the node-llama-cpp rows")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma list of the chat engines the weights rows run "
                   "on: pytorch, llama.cpp (default: both)")
    p.add_argument("--new-tokens", type=int, help="new tokens per reply (default 64)")
    p.add_argument("--runs", type=int, help="timed runs per row after the warm-up (default 3)")
    p.add_argument("--profile", action="store_true", help="also profile one prefill per quantized row at the most "
                   "threads: the ops that take its time")
    p.add_argument("--out", default="qwenbook-cpu-bench.json", help="where the JSON report goes")
    p.add_argument("--rows", help=argparse.SUPPRESS)  # internal: one thread count's PyTorch rows, from this spec file
    a = p.parse_args(argv)
    if a.rows:
        torch_rows(json.loads(Path(a.rows).read_text(encoding="utf-8")))
        return 0
    weights = [w.strip() for w in a.weights.split(",") if w.strip()]
    if unknown := [w for w in weights if w not in WEIGHTS]:
        p.error(f"unknown --weights {unknown}: choose from {', '.join(WEIGHTS)}")
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    if unknown := [e for e in engines if e not in ENGINES]:
        p.error(f"unknown --engines {unknown}: choose from {', '.join(ENGINES)}")
    try:
        threads = thread_counts(a.threads or ("1" if a.small else "1,2,all"))
    except ValueError as e:
        p.error(str(e))
    new_tokens = a.new_tokens or (8 if a.small else 64)
    runs = a.runs or (1 if a.small else 3)
    tokenizer = a.tokenizer or os.environ.get("QWENBOOK_TINY_MODEL")
    if not a.model and not tokenizer:
        p.error("pass --tokenizer DIR (a Qwen tokenizer folder, e.g. .qwenbook/models/tiny-qwen2) or --model DIR, "
                "or set QWENBOOK_TINY_MODEL")
    out = Path(a.out).resolve()
    report = Report()

    def save() -> None:
        out.write_text(json.dumps(asdict(report), indent=1), encoding="utf-8")

    def fail(row: str, error: str, trace: str = "") -> None:
        report.errors.append({"row": row, "error": error, **({"traceback": trace} if trace else {})})
        print(f"[bench.cpu] {row} failed: {error}", file=sys.stderr, flush=True)
        save()

    def add_torch_row(row: dict[str, Any]) -> None:
        if "prefill_profile" in row:
            report.profiles.append(row.pop("prefill_profile"))
        first = next((r for r in report.rows if r["weights"] in WEIGHTS), row)
        if row["prompt_ids"] != first["prompt_ids"]:
            report.errors.append({"row": row["path"], "error": "its prompt ids differ from the "
                                  f"{first['weights']} row's: the rows did not time the same prompt"})
        report.rows.append(row)
        report.meta.setdefault("prompt_tokens", row["prompt_tokens"])
        print(f"[bench.cpu] {row['path']} at {row['threads']} thread(s): {row['decode_tokens_per_s']:.1f} tokens/s, "
              f"first token {row['ttft_ms']:.0f} ms", flush=True)
        save()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qwenbook-cpu-bench-") as tmp:
        if a.model:
            folder = Path(a.model)
        elif a.small:
            folder = Path(tokenizer)  # the tiny model folder holds the tokenizer and a model
        else:
            folder = write_random_model("0.5b", Path(tokenizer), Path(tmp) / "qwen2.5-0.5b-shape")
        if not (folder / "config.json").is_file():
            p.error(f"{folder} has no config.json: pass a saved model folder")
        report.meta = {"cpu": platform.processor() or platform.machine(), "cores": all_cores(),
                       "torch": torch.__version__, "model": a.model or ("tiny test model" if a.small else
                                                                          "random Qwen2.5-0.5B shape"),
                       "threads": threads, "weights": weights, "new_tokens": new_tokens, "runs": runs,
                       "messages": MESSAGES}
        gguf = Path(tmp) / "model-q8_0.gguf"
        if not a.no_llama:
            try:
                report.meta["gguf"] = export_q8_0(folder, gguf)
            except Exception as e:  # noqa: BLE001 - recorded; the PyTorch rows still run
                fail("gguf export", f"{type(e).__name__}: {e}")
        save()
        for n in threads:
            # fp32's profile is the baseline the quantized prefills are read against.
            spec = {"folder": str(folder), "weights": weights, "engines": engines, "threads": n,
                    "new_tokens": new_tokens, "runs": runs, "profile": a.profile and n == max(threads),
                    "gguf_cache": str(Path(tmp) / "gguf-cache")}
            try:
                for got in run_torch_rows(spec, out):
                    if "error" in got:
                        fail(f"{got['weights']} at {n} thread(s)", got["error"], got["traceback"])
                        continue
                    add_torch_row(got["row"])
            except Exception as e:  # noqa: BLE001 - recorded in the JSON, the other rows go on
                fail(f"PyTorch rows at {n} thread(s)", f"{type(e).__name__}: {e}")
            prompt = next((r["prompt_ids"] for r in report.rows), None)
            if a.no_llama or not gguf.is_file() or prompt is None:
                continue
            try:
                row = run_llama_row(gguf, prompt, n, new_tokens, runs, out)
            except Exception as e:  # noqa: BLE001 - recorded in the JSON, the other rows go on
                fail(f"llama.cpp at {n} thread(s)", f"{type(e).__name__}: {e}")
                continue
            fp32 = next((r for r in report.rows if r["threads"] == n and r["weights"] == "fp32"
                         and r.get("engine") == "pytorch"), None)
            if fp32 is not None:  # informative: q8_0 rounding may flip a random model's near-tied argmax
                row["first_divergence_from_fp32"] = first_divergence(fp32["tokens"], row["tokens"])
            report.rows.append(row)
            print(f"[bench.cpu] llama.cpp q8_0 at {n} thread(s): {row['decode_tokens_per_s']:.1f} tokens/s, "
                  f"first token {row['ttft_ms']:.0f} ms", flush=True)
            save()
    report.meta["total_s"] = round(time.perf_counter() - started, 1)
    save()
    print(summarize(report), flush=True)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
