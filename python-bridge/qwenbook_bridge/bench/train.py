"""LoRA fine-tuning benchmark: the plain Hugging Face + peft recipe beside the engine's training step, same
model, same data, same card, each path in a process of its own.

    cd python-bridge && PYTHONPATH=. python -m qwenbook_bridge.bench.train --out bench-train.json
    python -m qwenbook_bridge.bench.train --small --device cpu        # seconds, for CI and laptops

Without `--model` it builds the Qwen2.5-7B shape (or a small one with `--small`) with random weights, so it
needs no download. Paths:

- `hf`: peft LoRA on the seven projections, what a tutorial's `Trainer` step does: `model(**batch)` with labels
  (full logits, transformers' loss), backward, gradient checkpointing, clip to 1.0, AdamW (fused on CUDA, the
  Trainer's default `adamw_torch_fused`).
- `liger`: the same with Liger Kernel's Qwen2 patches (rope, RMSNorm, SwiGLU, fused linear cross-entropy), where
  `liger_kernel` can be imported; otherwise its row says why not.
- `ours`: the engine's own pieces, as `train()` runs them (Trainable, collate, StepRunner): answer-only chunked
  loss, the fused LoRA layer, fused AdamW, no host syncs inside a step, gradient checkpointing.
- `ours-compiled`: the same with `compile=True` (torch.compile per decoder layer and, as `train()` does then,
  each step replayed from a CUDA graph where it can be captured; `--cuda-graphs off` leaves that out).
- `ours-int4`, `ours-int4-compiled` (not run by default): QLoRA, the same step over the model's linear layers
  quantized to int4 (group 128) as `quant: "int4"` loads them.
- `hf-trainer` (not run by default): a real `transformers.Trainer` on the `hf` path's batches, to check that `hf`
  steps as fast as the Trainer does.

Scenarios: synthetic ROWSxTOKENS shapes (`--configs`), every row one example of exactly that length (rows of
equal work, so tokens/s comes from the median step time), and `real-ROWSxLENGTH` (`--real`): the tutorials'
huanhuan.json and alpaca-mix.json through the Qwen chat template, where the HF paths pad each batch to its
longest row and ours packs; its figure is trained (answer) tokens over the timed steps' total time.

Every (scenario, path) runs in a fresh process (`--repeats` times, the order of the paths reversed on every
other repeat: hf, ours, ours, hf), with the same warm-up; each process builds the same random model from the same
seed and sees the same rows, so on synthetic rows the paths' loss curves must agree to bf16 rounding (the report
gives the largest difference, and the first loss beside an fp32 model's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from qwenbook_bridge.bench.train_data import DEFAULT_DATA_DIR
from qwenbook_bridge.bench.train_run import PATHS, PROJECTIONS, Job, run_job

DEFAULT_PATHS = ("hf", "liger", "ours", "ours-compiled")


@dataclass
class Report:
    meta: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)      # one per process, in the order they ran
    results: list[dict[str, Any]] = field(default_factory=list)   # one per (scenario, path), repeats pooled
    agreement: list[dict[str, Any]] = field(default_factory=list)
    fp32_first_loss: dict[str, float] = field(default_factory=dict)
    unavailable: list[dict[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)


def plan(scenarios: list[str], paths: list[str], repeats: int) -> list[tuple[str, str, int]]:
    """(scenario, path, repeat) in the order they run: every other repeat reverses the paths, so no path
    always goes first (a warmer card) or last (a hotter one)."""
    order = []
    for scenario in scenarios:
        for r in range(repeats):
            order += [(scenario, p, r) for p in (paths if r % 2 == 0 else list(reversed(paths)))]
    return order


def pooled(scenario: str, path: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a path's repeats: the median of every timed step (synthetic) or the timed steps' total
    (real rows, whose steps differ in work)."""
    step_s = [s for r in runs for s in r["step_s"]]
    tokens = sum(sum(r["tokens"]) for r in runs)
    trained = sum(sum(r["trained_tokens"]) for r in runs)
    median = statistics.median(step_s)
    real = scenario.startswith("real-")
    if real:
        basis, seconds = "total", sum(step_s)
    else:
        basis, seconds = "median step", median * len(step_s)
    peaks = [r["peak_gib"] for r in runs if r.get("peak_gib") is not None]
    return {"config": scenario, "path": path, "repeats": len(runs), "basis": basis,
            "tokens_per_s": tokens / seconds, "trained_tokens_per_s": trained / seconds,
            "step_ms_median": 1000 * median, "step_ms_min": 1000 * min(step_s), "step_ms_max": 1000 * max(step_s),
            "tokens_per_step": tokens / len(step_s), "trained_tokens_per_step": trained / len(step_s),
            "tokens_per_s_each_repeat": [sum(r["tokens"]) / sum(r["step_s"]) for r in runs],
            "peak_gib": max(peaks) if peaks else None, "pids": [r["pid"] for r in runs],
            "losses": runs[0]["losses"], "grad_norms": runs[0]["grad_norms"],
            "repeat_loss_max_abs_diff": max((abs(a - b) for r in runs[1:]
                                             for a, b in zip(runs[0]["losses"], r["losses"])), default=None)}


def compare(report: Report, dropout: float) -> None:
    by_key = {(r["config"], r["path"]): r for r in report.results}
    for (config, path), row in by_key.items():
        base = by_key.get((config, "hf"))
        if path == "hf" or base is None or not row["losses"]:
            continue
        if path.startswith("ours-int4"):
            report.agreement.append({"config": config, "path": path, "note": "not compared: an int4 base is not "
                                     "HF's bf16 weights, so their losses differ by the quantization error"})
            continue
        if config.startswith("real-"):
            report.agreement.append({"config": config, "path": path, "note": "not compared: HF pads each batch of "
                                     "rows, ours packs, so their steps see different examples"})
            continue
        pairs = list(zip(base["losses"], row["losses"]))
        norms = list(zip(base["grad_norms"], row["grad_norms"]))
        fp32 = report.fp32_first_loss.get(config)
        report.agreement.append({
            "config": config, "path": path, "steps": len(pairs), "dropout": dropout,
            "loss_max_abs_diff": max(abs(a - b) for a, b in pairs),
            "loss_change_hf": base["losses"][-1] - base["losses"][0],
            "first_loss_vs_fp32": None if fp32 is None else row["losses"][0] - fp32,
            "hf_first_loss_vs_fp32": None if fp32 is None else base["losses"][0] - fp32,
            "grad_norm_max_rel_diff": max(abs(a - b) / max(abs(a), 1e-12) for a, b in norms)})


def summarize(report: Report) -> str:
    meta = report.meta
    lines = [f"card: {meta.get('card')}   at {meta.get('started_utc')}   torch {meta.get('torch')}   transformers "
             f"{meta.get('transformers')}   peft {meta.get('peft')}",
             f"model: {meta.get('model')} ({meta.get('dtype')}); {meta.get('lora')}; warm-up {meta.get('warmup')}, "
             f"{meta.get('steps')} timed steps, {meta.get('repeats')} repeats, each in its own process", "",
             f"{'scenario':<13}{'path':<15}{'tokens/s':>10}{'trained/s':>11}{'vs HF':>8}{'peak GiB':>10}{'vs HF':>8}"
             f"{'step ms (med)':>15}  basis"]
    hf = {r["config"]: r for r in report.results if r["path"] == "hf"}
    for r in report.results:
        base = hf.get(r["config"])
        speed = (f"{r['trained_tokens_per_s'] / base['trained_tokens_per_s']:.2f}x" if base and r["path"] != "hf"
                 else "")
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        mem = (f"{r['peak_gib'] / base['peak_gib']:.2f}x" if base and r["path"] != "hf" and r["peak_gib"]
               and base["peak_gib"] else "")
        lines.append(f"{r['config']:<13}{r['path']:<15}{r['tokens_per_s']:>10.0f}{r['trained_tokens_per_s']:>11.0f}"
                     f"{speed:>8}{peak:>10}{mem:>8}{r['step_ms_median']:>15.1f}  {r['basis']}")
    lines += [f"{u['config']:<13}{u['path']:<15}not run: {u['reason']}" for u in report.unavailable]
    for a in report.agreement:
        if "note" in a:
            lines.append(f"{a['config']} {a['path']} vs hf: {a['note']}")
            continue
        lines.append(f"{a['config']} {a['path']} vs hf: max |loss diff| {a['loss_max_abs_diff']:.2e} over "
                     f"{a['steps']} steps (hf moved {a['loss_change_hf']:+.4f}); grad norm max rel diff "
                     f"{a['grad_norm_max_rel_diff']:.2e}")
        if a["first_loss_vs_fp32"] is not None:
            lines.append(f"  first loss minus the fp32 model's: hf {a['hf_first_loss_vs_fp32']:+.2e}, {a['path']} "
                         f"{a['first_loss_vs_fp32']:+.2e}")
    lines += [f"SKIPPED {s}" for s in report.skipped]
    lines += [f"ERROR {e['scenario']}: {e['error']}" for e in report.errors]
    return "\n".join(lines)


def parse_configs(text: str) -> list[str]:
    try:
        return [f"{int(b)}x{int(n)}" for b, n in (c.lower().split("x") for c in text.split(",") if c)]
    except ValueError:
        raise SystemExit(f"expected e.g. 4x384,2x2048 (rows x tokens), got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qwenbook_bridge.bench.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local model folder; default: random weights in the Qwen2.5-7B shape")
    p.add_argument("--small", action="store_true", help="a small random model and short rows (CPU/CI)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--configs", help="synthetic shapes, comma list of ROWSxTOKENS; default 4x384,2x2048 "
                                     "(small: 2x64,1x128); '' for none")
    p.add_argument("--real", help="real-data scenarios, comma list of ROWSxMAX_LENGTH; default 4x384 "
                                  "(small: 2x64); '' for none")
    p.add_argument("--real-rows", type=int, default=3000, help="rows of tutorial data (default 3000)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="the tutorials' notebooks/data")
    p.add_argument("--tokenizer", default=os.environ.get("QWENBOOK_TINY_MODEL"),
                   help="a folder with a Qwen tokenizer and chat template (default $QWENBOOK_TINY_MODEL)")
    p.add_argument("--paths", help=f"comma list of {list(PATHS)}; default {','.join(DEFAULT_PATHS)} on CUDA, "
                                    "hf,ours on CPU")
    p.add_argument("--repeats", type=int, default=2, help="processes per (scenario, path), order alternated")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; small 1)")
    p.add_argument("--steps", type=int, help="timed steps (default 10; small 2)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout for every path (default 0)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--no-fp32-reference", action="store_true", help="skip the fp32 first-loss process")
    p.add_argument("--profile", nargs="?", const="ours", default="",
                   help="profile these paths (default ours) on the first scenario's first repeat: "
                        "<out>.profile.txt and <out>.profile.json")
    p.add_argument("--keep-layers", type=int, default=0,
                   help="engine paths: leave the last N decoder layers out of gradient checkpointing")
    p.add_argument("--activation-memory", type=float, default=None, metavar="GB",
                   help="engine's compiled paths: GiB of extra activations selective checkpointing may keep "
                        "(TrainConfig.activation_memory_gb); default: the engine's (a quarter of free GPU memory)")
    p.add_argument("--compile-mode", default="", help="engine's compiled paths: a torch.compile mode "
                                                       "(e.g. reduce-overhead, max-autotune-no-cudagraphs)")
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="engine paths: replay each step from a CUDA graph after the warm-up; auto: the compiled "
                        "paths, as train() does with compile")
    p.add_argument("--deadline-s", type=float, help="skip processes that would start after this many seconds")
    p.add_argument("--out", default="qwenbook-bench-train.json", help="where the JSON report goes")
    p.add_argument("--child", help=argparse.SUPPRESS)         # SCENARIO:PATH:REPEAT, run by the parent
    p.add_argument("--child-result", help=argparse.SUPPRESS)  # where the child writes its JSON
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    warmup = a.warmup if a.warmup is not None else (1 if a.small else 3)
    steps = a.steps if a.steps is not None else (2 if a.small else 10)
    out = Path(a.out)
    if a.child:
        scenario, path, repeat = a.child.split(":")
        job = Job(scenario, path, int(repeat), warmup, steps, 8, 16.0, a.dropout, a.lr, 0,
                  out.with_suffix(".profile.txt") if a.profile else None, a.tokenizer, a.data_dir, a.real_rows,
                  a.keep_layers, a.compile_mode, a.cuda_graphs, a.activation_memory)
        result = run_job(job, a.model, "small" if a.small else "7b", device, dtype)
        Path(a.child_result).write_text(json.dumps(result), encoding="utf-8")
        return 0

    paths = (a.paths or (",".join(DEFAULT_PATHS) if device.type == "cuda" else "hf,ours")).split(",")
    unknown = [x for x in paths if x not in PATHS]
    if unknown:
        p.error(f"unknown path(s) {unknown}; choose from {list(PATHS)}")
    configs = parse_configs(a.configs if a.configs is not None else ("2x64,1x128" if a.small else "4x384,2x2048"))
    real = ["real-" + c for c in parse_configs(a.real if a.real is not None else ("2x64" if a.small else "4x384"))]
    if a.profile:
        for suffix in (".profile.txt", ".profile.json"):
            out.with_suffix(suffix).write_text("", encoding="utf-8")
    report = Report(meta={
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__,
        "model": a.model or ("random Qwen2 small" if a.small else "random Qwen2.5-7B shape"),
        "dtype": str(dtype).removeprefix("torch."),
        "lora": f"LoRA r=8 alpha=16 dropout={a.dropout:g} on {len(PROJECTIONS)} projections, lr {a.lr:g}, "
                "gradient checkpointing, clip 1.0, AdamW",
        "keep_layers": a.keep_layers, "compile_mode": a.compile_mode or "default", "cuda_graphs": a.cuda_graphs,
        "activation_memory_gb": "engine default" if a.activation_memory is None else a.activation_memory,
        "configs": configs + real, "paths": paths, "warmup": warmup, "steps": steps, "repeats": a.repeats,
        "real_rows": a.real_rows, "tokenizer": a.tokenizer})
    started = time.perf_counter()
    # The child gets the parent's options (minus the report's path) and its own job.
    child_argv = list(argv)
    if "--profile" in child_argv:
        i = child_argv.index("--profile")
        del child_argv[i:i + (2 if i + 1 < len(child_argv) and not child_argv[i + 1].startswith("-") else 1)]
    profiled = [x for x in a.profile.split(",") if x]
    if "--out" in child_argv:
        i = child_argv.index("--out")
        del child_argv[i:i + 2]
    jobs = [] if a.no_fp32_reference or dtype == torch.float32 else [(c, "fp32-reference", 0) for c in configs]
    jobs += plan(configs + real, paths, a.repeats)
    done: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for scenario, path, repeat in jobs:
        what = f"{scenario} {path} #{repeat}"
        if a.deadline_s is not None and time.perf_counter() - started > a.deadline_s:
            report.skipped.append(what)
            continue
        profile = path in profiled and repeat == 0 and scenario == (configs + real)[0]
        result = run_child(child_argv + (["--profile"] if profile else []) + ["--out", str(out)],
                           f"{scenario}:{path}:{repeat}", what, report)
        if result is None:
            continue
        if path == "fp32-reference":
            report.fp32_first_loss[scenario] = result["fp32_first_loss"]
        elif "unavailable" in result:
            if repeat == 0:
                report.unavailable.append({"config": scenario, "path": path, "reason": result["unavailable"]})
        else:
            report.runs.append({k: v for k, v in result.items()})
            done.setdefault((scenario, path), []).append(result)
        save(report, out)
    for (scenario, path), runs in done.items():
        report.results.append(pooled(scenario, path, runs))
    compare(report, a.dropout)
    report.meta["total_s"] = time.perf_counter() - started
    save(report, out)
    print(summarize(report), flush=True)
    return 1 if report.errors else 0


def run_child(argv: list[str], child: str, what: str, report: Report) -> dict[str, Any] | None:
    """Runs one job in a fresh interpreter; a failure (out of memory, a compile error) is recorded and the
    other jobs go on."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "qwenbook_bridge.bench.train", *argv, "--child", child,
               "--child-result", str(result_file)]
        print(f"[bench] {what}", file=sys.stderr, flush=True)
        # The child imports this package the way the parent did, installed or not.
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                                          os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        if proc.returncode != 0 or not result_file.is_file():
            tail = proc.stdout[-3000:]
            report.errors.append({"scenario": what, "error": f"exit code {proc.returncode}", "output": tail})
            print(f"[bench] {what} failed (exit {proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
            return None
        result: dict[str, Any] = json.loads(result_file.read_text(encoding="utf-8"))
    brief = {k: v for k, v in result.items() if k not in ("losses", "grad_norms", "step_s", "tokens", "examples",
                                                          "trained_tokens")}
    print(f"[bench] {json.dumps(brief)}", file=sys.stderr, flush=True)
    return result


def save(report: Report, out: Path) -> None:
    out.write_text(json.dumps(asdict(report), indent=2), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
