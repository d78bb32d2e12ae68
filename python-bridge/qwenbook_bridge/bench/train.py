"""LoRA fine-tuning benchmark: the plain Hugging Face + peft recipe beside the engine's training step, same
model, same data, same process, same card.

    cd python-bridge && PYTHONPATH=. python -m qwenbook_bridge.bench.train --out bench-train.json
    python -m qwenbook_bridge.bench.train --small --device cpu        # seconds, for CI and laptops

Without `--model` it builds the Qwen2.5-7B shape (or a small one with `--small`) with random weights, so it
needs no download. Paths:

- `hf`: peft LoRA on the seven projections, `model(input_ids, labels=labels)` (full logits, transformers'
  loss), gradient checkpointing, clip, `torch.optim.AdamW`: the textbook recipe.
- `ours`: the engine's own pieces, as `train()` runs them (Trainable, collate, StepRunner): answer-only chunked
  loss, the fused LoRA layer, fused AdamW, no host syncs inside a step, gradient checkpointing.
- `ours-compiled`: the same with `compile=True` (torch.compile per decoder layer).

Both start from the same weights and the same LoRA initialization and see the same rows in the same order,
so with dropout 0 their loss curves must agree to bf16 rounding; the report gives the largest difference, and
each path's first loss (before any update) beside the same loss computed by an fp32 copy of the model, which
says how large bf16 rounding alone is and which path stays closer to exact arithmetic.
Every row is one example of exactly the configured length whose first 20-50% is prompt (no loss), the rest
answer; its tokens come from a 1,024-token sub-vocabulary, so the loss falls visibly within a few steps.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwenbook_bridge.bench.model import build_random_model, load_model, run_scenario
from qwenbook_bridge.engine.data.chat_encoding import IGNORE_INDEX, Example
from qwenbook_bridge.engine.train.batches import collate
from qwenbook_bridge.engine.train.step import StepRunner, build_optimizer
from qwenbook_bridge.engine.train.trainable import Trainable, precision_plan
from qwenbook_bridge.engine.train.config import LoraSettings, TrainConfig

PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
PATHS = ("hf", "ours", "ours-compiled")
StepFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Settings:
    configs: list[tuple[int, int]]   # (rows per step, tokens per row)
    warmup: int
    steps: int
    paths: list[str]
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    lr: float = 2e-4
    seed: int = 0
    profile: bool = False
    deadline_s: float | None = None


@dataclass
class Report:
    meta: dict[str, Any] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    agreement: list[dict[str, Any]] = field(default_factory=list)
    fp32_first_loss: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)


def synthetic_rows(vocab: int, count: int, length: int, seed: int) -> list[Example]:
    gen = torch.Generator().manual_seed(seed)
    # Below the special-token range, so a real tokenizer's control tokens are never drawn.
    pool = torch.randperm(min(vocab, 151643), generator=gen)[:1024]
    rows = []
    for i in range(count):
        ids = pool[torch.randint(0, pool.numel(), (length,), generator=gen)].tolist()
        prompt = int(length * (0.2 + 0.3 * torch.rand((), generator=gen).item()))
        rows.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:], "synthetic", i + 1))
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    def __init__(self, model: Any, settings: Settings, report: Report, out: Path) -> None:
        self.model, self.s, self.report, self.out = model, settings, report, out
        self.device = next(model.parameters()).device
        self.started = time.perf_counter()

    def save(self) -> None:
        self.out.write_text(json.dumps(asdict(self.report), indent=2), encoding="utf-8")

    def guarded(self, what: str, fn: Callable[[], None]) -> None:
        if self.s.deadline_s is not None and time.perf_counter() - self.started > self.s.deadline_s:
            self.report.skipped.append(what)
            print(f"[bench] {what} skipped: past the {self.s.deadline_s:.0f} s deadline", file=sys.stderr, flush=True)
            return
        run_scenario(what, fn, self.report.errors, self.device, self.save)

    def measure(self, config: tuple[int, int], path: str, step: StepFn, setup_s: float) -> None:
        """Warm-up steps, then a timed window; losses and norms stay on the device until the end."""
        batch, length = config
        losses: list[torch.Tensor] = []
        norms: list[torch.Tensor] = []
        start = time.perf_counter()
        for i in range(self.s.warmup):
            loss, norm = step(i)
            losses.append(loss)
            norms.append(norm)
        _sync(self.device)
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(self.s.warmup, self.s.warmup + self.s.steps):
            loss, norm = step(i)
            losses.append(loss)
            norms.append(norm)
        _sync(self.device)
        window = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        row = {"config": f"{batch}x{length}", "path": path, "tokens_per_s": batch * length * self.s.steps / window,
               "step_ms": 1000 * window / self.s.steps, "peak_gib": peak, "setup_s": setup_s, "warmup_s": warmup_s,
               "losses": torch.stack(losses).float().tolist(), "grad_norms": torch.stack(norms).float().tolist()}
        self.report.results.append(row)
        print(f"[bench] {json.dumps({k: v for k, v in row.items() if k not in ('losses', 'grad_norms')})}",
              flush=True)
        if self.s.profile and config == self.s.configs[0]:
            self.profile(f"{row['config']} {path}", step, self.s.warmup + self.s.steps)

    def profile(self, label: str, step: StepFn, first: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for i in range(first, first + 2):
                step(i)
            _sync(self.device)
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        with self.out.with_suffix(".profile.txt").open("a", encoding="utf-8") as f:
            f.write(f"== {label}, 2 steps\n{prof.key_averages().table(sort_by=key, row_limit=30)}\n\n")

    def _fresh(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def run_hf(self, config: tuple[int, int], rows: list[Example]) -> None:
        from peft import LoraConfig, get_peft_model

        batch, _ = config
        self._fresh()
        start = time.perf_counter()
        ids = torch.tensor([r.input_ids for r in rows], device=self.device)
        labels = torch.tensor([r.labels for r in rows], device=self.device)
        torch.manual_seed(self.s.seed)
        peft_model = get_peft_model(self.model, LoraConfig(
            r=self.s.r, lora_alpha=self.s.alpha, lora_dropout=self.s.dropout, target_modules=PROJECTIONS,
            bias="none", task_type="CAUSAL_LM"))
        try:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.train()
            params = [p for p in self.model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=self.s.lr, weight_decay=0.0)

            def step(i: int) -> tuple[torch.Tensor, torch.Tensor]:
                rows_i = slice(i * batch, (i + 1) * batch)
                loss = peft_model(input_ids=ids[rows_i], labels=labels[rows_i], use_cache=False).loss
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return loss.detach(), norm.detach()

            self.measure(config, "hf", step, time.perf_counter() - start)
        finally:
            peft_model.unload()
            self.model.gradient_checkpointing_disable()
            self.model.eval()

    def run_ours(self, config: tuple[int, int], rows: list[Example], compiled: bool) -> None:
        batch, length = config
        self._fresh()
        start = time.perf_counter()
        cfg = TrainConfig(output_dir="-", lora=LoraSettings(r=self.s.r, alpha=self.s.alpha, dropout=self.s.dropout),
                          max_length=length, batch_size=batch, grad_accum=1, lr=self.s.lr, schedule="constant",
                          gradient_checkpointing=True, packing=True, compile=compiled, seed=self.s.seed)
        cfg.validate()
        autocast, use_scaler, _ = precision_plan(cfg, self.model, self.device)
        units = [[i] for i in range(len(rows))]
        batches = [collate(rows, units, range(i * batch, (i + 1) * batch), 0, True).to(self.device)
                   for i in range(len(rows) // batch)]
        if compiled:
            # A clean slate, so this shape compiles once, statically, whatever ran before.
            torch._dynamo.reset()
        trainable = Trainable(self.model, cfg, tokenizer=None)
        torch.manual_seed(self.s.seed)
        trainable.prepare()
        try:
            optimizer = build_optimizer(trainable.parameters(), cfg, self.device)
            runner = StepRunner(trainable, optimizer, device=self.device, max_grad_norm=cfg.max_grad_norm,
                                autocast=autocast,
                                scaler=torch.amp.GradScaler(self.device.type) if use_scaler else None)

            def step(i: int) -> tuple[torch.Tensor, torch.Tensor]:
                stats = runner([batches[i]])
                return stats.loss, stats.grad_norm

            self.measure(config, "ours-compiled" if compiled else "ours", step, time.perf_counter() - start)
        finally:
            trainable.restore()

    def fp32_reference(self, data: dict[tuple[int, int], list[Example]]) -> None:
        """The first batch's loss from an fp32 copy of the base model (LoRA B starts at zero, so every path's
        first loss is this loss up to rounding)."""
        weight_bytes = sum(t.numel() * t.element_size() for t in self.model.parameters())
        if next(self.model.parameters()).dtype == torch.float32:
            return
        if self.device.type == "cuda" and torch.cuda.mem_get_info(self.device)[0] < 2.5 * weight_bytes:
            print("[bench] not enough free device memory for an fp32 reference copy", file=sys.stderr)
            return
        ref = copy.deepcopy(self.model).float()
        with torch.no_grad():
            for (batch, length), rows in data.items():
                ids = torch.tensor([r.input_ids for r in rows[:batch]], device=self.device)
                labels = torch.tensor([r.labels for r in rows[:batch]], device=self.device)
                loss = ref(input_ids=ids, labels=labels, use_cache=False).loss
                self.report.fp32_first_loss[f"{batch}x{length}"] = float(loss)
        del ref

    def compare(self) -> None:
        by_key = {(r["config"], r["path"]): r for r in self.report.results}
        for (config, path), row in by_key.items():
            base = by_key.get((config, "hf"))
            if path == "hf" or base is None:
                continue
            pairs = list(zip(base["losses"], row["losses"]))
            norms = list(zip(base["grad_norms"], row["grad_norms"]))
            self.report.agreement.append({
                "config": config, "path": path, "steps": len(pairs), "dropout": self.s.dropout,
                "loss_max_abs_diff": max(abs(a - b) for a, b in pairs),
                "loss_change_hf": base["losses"][-1] - base["losses"][0],
                "first_loss_vs_fp32": _vs(row["losses"][0], self.report.fp32_first_loss.get(config)),
                "hf_first_loss_vs_fp32": _vs(base["losses"][0], self.report.fp32_first_loss.get(config)),
                "grad_norm_max_rel_diff": max(abs(a - b) / max(abs(a), 1e-12) for a, b in norms)})


def _vs(value: float, reference: float | None) -> float | None:
    return None if reference is None else value - reference


def summarize(report: Report) -> str:
    meta = report.meta
    lines = [f"card: {meta.get('card')}   torch {meta.get('torch')}   transformers {meta.get('transformers')}   "
             f"peft {meta.get('peft')}",
             f"model: {meta.get('model')} ({meta.get('parameters', 0) / 1e9:.2f} B params, {meta.get('dtype')}); "
             f"{meta.get('lora')}", "",
             f"{'config':<9}{'path':<15}{'tokens/s':>10}{'vs HF':>8}{'peak GiB':>10}{'vs HF':>8}{'step ms':>9}"
             f"{'setup+warm-up s':>17}"]
    hf = {r["config"]: r for r in report.results if r["path"] == "hf"}
    for r in report.results:
        base = hf.get(r["config"])
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and r["path"] != "hf" else ""
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        mem = (f"{r['peak_gib'] / base['peak_gib']:.2f}x" if base and r["path"] != "hf" and r["peak_gib"]
               else "")
        lines.append(f"{r['config']:<9}{r['path']:<15}{r['tokens_per_s']:>10.0f}{speed:>8}{peak:>10}{mem:>8}"
                     f"{r['step_ms']:>9.1f}{r['setup_s'] + r['warmup_s']:>17.1f}")
    for config in dict.fromkeys(r["config"] for r in report.results):
        rows = [r for r in report.results if r["config"] == config]
        lines += ["", f"loss per step, {config}: " + "  ".join(r["path"] for r in rows)]
        for i in range(max(len(r["losses"]) for r in rows)):
            lines.append(f"  {i + 1:>3}  " + "  ".join(f"{r['losses'][i]:.5f}" if i < len(r["losses"]) else "-"
                                                       for r in rows))
    for a in report.agreement:
        lines.append(f"{a['config']} {a['path']} vs hf: max |loss diff| {a['loss_max_abs_diff']:.2e} over "
                     f"{a['steps']} steps (hf moved {a['loss_change_hf']:+.4f}); grad norm max rel diff "
                     f"{a['grad_norm_max_rel_diff']:.2e}")
        if a["first_loss_vs_fp32"] is not None:
            lines.append(f"  first loss minus the fp32 model's: hf {a['hf_first_loss_vs_fp32']:+.2e}, {a['path']} "
                         f"{a['first_loss_vs_fp32']:+.2e}")
    lines += [f"SKIPPED {s}" for s in report.skipped]
    lines += [f"ERROR {e['scenario']}: {e['error']}" for e in report.errors]
    return "\n".join(lines)


def parse_configs(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(b), int(n)) for b, n in (c.lower().split("x") for c in text.split(","))]
    except ValueError:
        raise SystemExit(f"--configs: expected e.g. 4x384,2x2048 (rows x tokens), got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwenbook_bridge.bench.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local model folder; default: random weights in the Qwen2.5-7B shape")
    p.add_argument("--small", action="store_true", help="a small random model and short rows (CPU/CI)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--configs", help="comma list of ROWSxTOKENS; default 4x384,2x2048 (small: 2x64,1x128)")
    p.add_argument("--paths", help=f"comma list of {list(PATHS)}; default: all on CUDA, hf,ours on CPU")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; small 1)")
    p.add_argument("--steps", type=int, help="timed steps (default 8; small 2)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout for every path (default 0)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--profile", action="store_true", help="kernel-time tables (first config) to <out>.profile.txt")
    p.add_argument("--deadline-s", type=float, help="skip scenarios that would start after this many seconds")
    p.add_argument("--out", default="qwenbook-bench-train.json", help="where the JSON report goes")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    paths = (a.paths or (",".join(PATHS) if device.type == "cuda" else "hf,ours")).split(",")
    unknown = [x for x in paths if x not in PATHS]
    if unknown:
        p.error(f"unknown path(s) {unknown}; choose from {list(PATHS)}")
    settings = Settings(configs=parse_configs(a.configs or ("2x64,1x128" if a.small else "4x384,2x2048")),
                        warmup=a.warmup if a.warmup is not None else (1 if a.small else 3),
                        steps=a.steps if a.steps is not None else (2 if a.small else 8), paths=paths,
                        dropout=a.dropout, lr=a.lr, profile=a.profile, deadline_s=a.deadline_s)
    if device.type == "cuda":
        # cuDNN's attention was seen building a new plan for every shape on the benchmark machine.
        torch.backends.cuda.enable_cudnn_sdp(False)
    out = Path(a.out)
    if a.profile:
        out.with_suffix(".profile.txt").write_text("", encoding="utf-8")

    start = time.perf_counter()
    torch.manual_seed(0)
    model = load_model(a.model, device, dtype) if a.model else build_random_model("small" if a.small else "7b",
                                                                                  device, dtype)
    report = Report(meta={
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__,
        "model": a.model or ("random Qwen2 small" if a.small else "random Qwen2.5-7B shape"),
        "dtype": str(dtype).removeprefix("torch."), "parameters": sum(t.numel() for t in model.parameters()),
        "lora": f"LoRA r={settings.r} alpha={settings.alpha:g} dropout={settings.dropout:g} on {len(PROJECTIONS)} "
                f"projections, lr {settings.lr:g}, gradient checkpointing, AdamW",
        "configs": [f"{b}x{n}" for b, n in settings.configs], "warmup": settings.warmup, "steps": settings.steps,
        "weights_gib": torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "model_build_s": time.perf_counter() - start})
    bench = Bench(model, settings, report, out)
    bench.save()
    data = {c: synthetic_rows(model.config.vocab_size, c[0] * (settings.warmup + settings.steps + 2), c[1],
                              seed=settings.seed + i) for i, c in enumerate(settings.configs)}
    bench.guarded("fp32 reference", lambda: bench.fp32_reference(data))
    # Eager paths for every config first, compiled ones last: a deadline then cuts the slow-to-start ones.
    for config in settings.configs:
        name = f"{config[0]}x{config[1]}"
        if "hf" in paths:
            bench.guarded(f"{name} hf", lambda c=config: bench.run_hf(c, data[c]))
        if "ours" in paths:
            bench.guarded(f"{name} ours", lambda c=config: bench.run_ours(c, data[c], compiled=False))
    if "ours-compiled" in paths:
        for config in settings.configs:
            bench.guarded(f"{config[0]}x{config[1]} ours-compiled",
                          lambda c=config: bench.run_ours(c, data[c], compiled=True))
    bench.compare()
    report.meta["total_s"] = time.perf_counter() - start
    bench.save()
    print(summarize(report), flush=True)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
