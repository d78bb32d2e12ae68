"""Several-GPU benchmark: data-parallel LoRA and FSDP2 full fine-tuning on 1..N GPUs, and one model spread
over every GPU generating through the engine.

    cd python-bridge && PYTHONPATH=. python -m qwenbook_bridge.bench.dist --ddp 1,2,4 --fsdp 2,4 \\
        --spread 72b --tokenizer ../.qwenbook/models/tiny-qwen2 --out bench-dist.json
    python -m qwenbook_bridge.bench.dist --small --ddp 1,2 --fsdp 2 --spread small --out x.json   # CPU, gloo

The four-GPU run recorded in the project notes was (from python-bridge/, the tokenizer folder holding the tiny
model's tokenizer.json, tokenizer_config.json and chat_template.jinja):

    python -m qwenbook_bridge.bench.dist --ddp 1,2,4 --fsdp 4 --spread 72b --tokenizer TOK --out dist-a.json
    python -m qwenbook_bridge.bench.dist --ddp "" --fsdp 2 --out dist-b.json

Training: each configuration runs under torchrun (bench/dist_rank.py) with the Qwen2.5-7B shape (random
weights, same seed everywhere) and the same global batch, so the per-step losses of 1, 2 and 4 ranks must
agree to bf16 rounding; tokens/s counts every rank, scaling efficiency is tokens/s on N ranks over N times
tokens/s on the fewest ranks of that strategy. Spread generation: the Qwen2.5-72B shape (~145 GB in bf16)
placed by the engine's `devices: "auto"` placement (accelerate's device map over every visible GPU, weights
drawn in place rather than read from disk), then the engine's `generate` beside transformers' `generate` on
the same model. The JSON is saved after every run, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qwenbook_bridge.bench.decode import hf_generate
from qwenbook_bridge.bench.model import QWEN25_7B, SMALL
from qwenbook_bridge.bench.needs_gpu import require_cuda

QWEN25_72B: dict[str, Any] = dict(
    vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
    num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, use_sliding_window=False)
SHAPES = {"72b": QWEN25_72B, "7b": QWEN25_7B, "small": SMALL}


def _ranks(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()] if text else []


def train_run(spec: dict[str, Any], ranks: int, timeout_s: float) -> dict[str, Any]:
    """One torchrun of bench_dist_rank on `ranks` processes; rank 0's result, or the error it ended with."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps(spec), encoding="utf-8")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        started = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   f"--nproc_per_node={ranks}", "-m", "qwenbook_bridge.bench.dist_rank", str(path)],
                                  capture_output=True, text=True, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"no result within {timeout_s:.0f} s"}
        lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
        if proc.returncode != 0 or not lines:
            return {"error": f"exit code {proc.returncode}: {proc.stderr[-2500:]}"}
        result = json.loads(lines[-1].removeprefix("BENCH_RESULT "))
        result["wall_s"] = time.perf_counter() - started
        return result


def summarize_training(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scaling and loss agreement of each run against the fewest-rank run of the same strategy and method."""
    rows = []
    for run in runs:
        if "error" in run:
            continue
        same = [r for r in runs if "error" not in r and (r["strategy"], r["method"]) == (run["strategy"], run["method"])]
        base = min(same, key=lambda r: r["ranks"])
        scale = run["ranks"] / base["ranks"]
        rows.append({
            "strategy": run["strategy"], "method": run["method"], "ranks": run["ranks"],
            "tokens_per_s": round(run["tokens_per_s"], 1),
            "tokens_per_s_median_step": round(run.get("tokens_per_s_median_step", 0.0), 1),
            "speedup_vs_base": round(run["tokens_per_s"] / base["tokens_per_s"], 3) if base["tokens_per_s"] else None,
            "base_ranks": base["ranks"],
            "scaling_efficiency": round(run["tokens_per_s"] / (scale * base["tokens_per_s"]), 3)
            if base["tokens_per_s"] else None,
            "loss_max_abs_diff_vs_base": max(abs(a - b) for a, b in zip(run["losses"], base["losses"])),
            "peak_gib_per_rank": [round(p["peak_bytes"] / 2**30, 2) for p in run["per_rank"]],
            "first_loss": run["losses"][0], "last_loss": run["losses"][-1]})
    return rows


def build_spread(shape: str, dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
    """A random-weight model placed as `devices: "auto"` places a load: the engine's placement, accelerate's
    balanced device map, weights drawn on the device each one lands on."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory, set_module_tensor_to_device
    from transformers import AutoModelForCausalLM, Qwen2Config

    from qwenbook_bridge.engine.models.device_map import resolve_placement

    config = Qwen2Config(**SHAPES[shape])
    placement = resolve_placement("auto")
    if placement is None or not placement.spread:  # no GPU: the whole model on the CPU, as a load would do
        from qwenbook_bridge.bench.model import build_random_model

        return build_random_model(shape if shape != "72b" else "small", torch.device("cpu"), torch.float32), {"": "cpu"}
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    keep = model._no_split_modules
    budget = get_balanced_memory(model, max_memory=placement.max_memory, no_split_module_classes=keep, dtype=dtype)
    device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=keep, dtype=dtype)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        where = next(device_map[k] for k in sorted(device_map, key=len, reverse=True)
                     if name == k or name.startswith(k + ".") or k == "")
        device = torch.device("cuda", where) if isinstance(where, int) else torch.device(where)
        value = torch.empty(param.shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            value.fill_(1.0)
        else:
            value.normal_(0.0, config.initializer_range)
        set_module_tensor_to_device(model, name, device, value=value)
    model = dispatch_model(model, device_map=device_map)
    model.hf_device_map = device_map
    model.generation_config.eos_token_id = None
    return model.eval(), device_map


def _sync_all() -> None:
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def _timed(fn: Callable[[], Any]) -> float:
    _sync_all()
    t0 = time.perf_counter()
    fn()
    _sync_all()
    return time.perf_counter() - t0


def spread_generation(shape: str, tokenizer_dir: Path, new_tokens: int, long_prompt: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from qwenbook_bridge.engine.generate.generation import generate, prompt_ids
    from qwenbook_bridge.engine.generate.sampling import SamplingParams
    from qwenbook_bridge.engine.models.devices import memory_snapshot
    from qwenbook_bridge.engine.models.loading import LoadedModel
    from qwenbook_bridge.engine.models.device_map import devices_used, first_device

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    start = time.perf_counter()
    model, device_map = build_spread(shape, dtype)
    build_s = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    device = first_device(model, torch.device("cpu"))
    params = sum(p.numel() for p in model.parameters())
    loaded = LoadedModel(model_id=f"qwen2.5-{shape}-shape:{str(dtype).removeprefix('torch.')}:auto",
                         source=f"random {shape}", path=Path("-"), model=model, tokenizer=tokenizer,
                         info={"context_length": model.config.max_position_embeddings}, device=device, dtype=dtype)
    greedy = SamplingParams(max_tokens=new_tokens, greedy=True)
    short = [{"role": "user", "content": "Tell me about the four cards this model is spread over."}]
    long = [{"role": "user", "content": " hello" * long_prompt}]
    # A whole run of each path first: the first pass over four cards pays for allocator growth and kernel
    # selection on every card (measured: 4.9 tok/s on a first 32-token run, 14.4 on the second).
    generate(loaded, short, greedy)
    ours = generate(loaded, short, greedy)
    ours_long = min((generate(loaded, long, SamplingParams(max_tokens=1, greedy=True)) for _ in range(2)),
                    key=lambda r: r.ttft_ms)

    ids = torch.tensor([prompt_ids(loaded, short)], device=device)
    long_ids = torch.tensor([prompt_ids(loaded, long)], device=device)
    hf_generate(model, ids, new_tokens)
    t_full = _timed(lambda: hf_generate(model, ids, new_tokens))
    t_one = _timed(lambda: hf_generate(model, ids, 1))
    hf_ttft = min(_timed(lambda: hf_generate(model, long_ids, 1)) for _ in range(2))
    hf_rate = (new_tokens - 1) / max(t_full - t_one, 1e-9)
    return {"shape": shape, "parameters": params, "build_s": round(build_s, 1),
            "devices": devices_used(model, device), "layers_per_device": _layers_per_device(device_map),
            "ours": {"tokens_per_s": ours.tokens_per_s, "completion_tokens": ours.completion_tokens,
                     "ttft_ms_short": ours.ttft_ms, "ttft_ms_long": ours_long.ttft_ms,
                     "long_prompt_tokens": ours_long.prompt_tokens},
            "hf": {"tokens_per_s": round(hf_rate, 3), "ttft_ms_long": round(hf_ttft * 1000, 3)},
            "ours_over_hf_decode": round(ours.tokens_per_s / hf_rate, 3) if hf_rate else None,
            "memory": memory_snapshot()}


def _layers_per_device(device_map: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key, where in device_map.items():
        if ".layers." in f".{key}.":
            name = f"cuda:{where}" if isinstance(where, int) else str(where)
            counts[name] = counts.get(name, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--small", action="store_true", help="the small shape, for CPUs (gloo)")
    ap.add_argument("--ddp", default="1,2", help="rank counts for data-parallel LoRA, e.g. 1,2,4")
    ap.add_argument("--fsdp", default="", help="rank counts for FSDP2 full fine-tuning, e.g. 2,4")
    ap.add_argument("--fsdp-method", default="full", choices=["full", "lora"])
    ap.add_argument("--spread", default="", help="a shape to spread over every GPU and generate with (72b, 7b)")
    ap.add_argument("--tokenizer", type=Path, default=Path(__file__).resolve().parents[3] / ".qwenbook/models/tiny-qwen2")
    ap.add_argument("--micro-rows", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--global-micro", type=int, default=4, help="micro-batches per step over all ranks")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--long-prompt", type=int, default=2040)
    ap.add_argument("--run-timeout", type=float, default=300)
    a = ap.parse_args(argv)
    if not a.small:
        # The 7B and 72B shapes train and generate on GPUs only: one rank a GPU, the spread over every card.
        require_cuda("python -m qwenbook_bridge.bench.dist", gpus=max([1, *_ranks(a.ddp), *_ranks(a.fsdp)]),
                     instead="`--small` runs the small shape on CPU processes (gloo)")

    report: dict[str, Any] = {"meta": {
        "python": platform.python_version(), "torch": torch.__version__,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [], "argv": sys.argv[1:] if argv is None else argv},
        "training": [], "summary": [], "spread": None, "errors": []}
    a.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["summary"] = summarize_training(report["training"])
        a.out.write_text(json.dumps(report, indent=2), encoding="utf-8")

    base = {"shape": "small" if a.small else "7b", "micro_rows": a.micro_rows, "length": a.length,
            "global_micro_batches": a.global_micro, "warmup": a.warmup, "steps": a.steps, "r": 16, "lr": 1e-4,
            "seed": 0}
    plan = [("ddp", "lora", n) for n in _ranks(a.ddp)] + [("fsdp", a.fsdp_method, n) for n in _ranks(a.fsdp)]
    for strategy, method, ranks in plan:
        print(f"[bench-dist] {strategy} {method} on {ranks} rank(s)", file=sys.stderr, flush=True)
        result = train_run({**base, "strategy": strategy, "method": method}, ranks, a.run_timeout)
        if "error" in result:
            report["errors"].append({"run": f"{strategy}/{method}/{ranks}", "error": result["error"]})
            print(f"[bench-dist] failed: {result['error'][-600:]}", file=sys.stderr, flush=True)
        else:
            report["training"].append(result)
        save()
    if a.spread:
        print(f"[bench-dist] {a.spread} spread over every GPU", file=sys.stderr, flush=True)
        try:
            report["spread"] = spread_generation(a.spread, a.tokenizer, a.new_tokens, a.long_prompt)
        except Exception as e:  # noqa: BLE001 - recorded beside the training figures, which stay
            import traceback

            report["errors"].append({"run": f"spread/{a.spread}", "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()[-3000:]})
        save()
    print(json.dumps({"summary": report["summary"], "spread": report["spread"], "errors": report["errors"]},
                     indent=1))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
