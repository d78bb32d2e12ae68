"""DPO step benchmark: the engine's preference step beside TRL's DPO loss code, same model, same pairs, each path
in a process of its own (as bench/train.py does for supervised steps).

    cd python-bridge && PYTHONPATH=. python -m qwenbook_bridge.bench.preference --out bench-dpo.json   # GPU, 7B shape
    python -m qwenbook_bridge.bench.preference --smoke                # CPU, the tiny model, seconds

Without `--model` it builds the Qwen2.5-7B shape with random weights (`--shape`), so nothing is downloaded. Both
paths train LoRA (r 8, the seven projections, same seed so the same initialization) with gradient checkpointing,
clip to 1.0 and AdamW (fused on CUDA), on synthetic pairs of PROMPTxANSWER tokens, chosen and rejected in one batch:

- `trl`: TRL's `DPOTrainer._compute_loss` (the loss code of its trainer, called on a stand-in holding the settings
  it reads): the peft model's forward with full logits, the reference from the same model with the adapter
  switched off under no_grad, sigmoid loss with beta 0.1.
- `ours`: the engine's step as `train()` runs it for a DPO run on LoRA: `collate_pairs`, `StepRunner` with the
  preference objective (answer-only chunked log-probs, the fused LoRA layer, the reference in the same step).

Step times are the median of CUDA-event times of the timed steps (the wall clock on the CPU); the report has the
peak allocated memory of each process and the first steps' losses of both, which must agree (same weights, same
initialization, same pairs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from qwenbook_bridge.bench.step_marks import elapsed, mark

PATHS = ("trl", "ours")
PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def synthetic_pairs(vocab: int, count: int, prompt: int, answer: int, seed: int) -> list[Any]:
    from qwenbook_bridge.engine.data.chat_encoding import IGNORE_INDEX, Example
    from qwenbook_bridge.engine.data.preference_data import PreferenceExample

    gen = torch.Generator().manual_seed(seed)
    pool = torch.randperm(min(vocab, 151643), generator=gen)[:1024]

    def draw(n: int) -> list[int]:
        return pool[torch.randint(0, pool.numel(), (n,), generator=gen)].tolist()

    pairs = []
    for i in range(count):
        head = draw(prompt)
        parts = [head + ans for ans in (draw(answer), draw(answer))]
        examples = [Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:], "synthetic", i + 1) for ids in parts]
        pairs.append(PreferenceExample(examples[0], examples[1], "synthetic", i + 1))
    return pairs


def run_path(path: str, a: argparse.Namespace) -> dict[str, Any]:
    """One path in this process: build the model, take warm-up and timed steps, report times, memory, losses."""
    from qwenbook_bridge.bench.model import build_random_model, load_model
    from qwenbook_bridge.engine.train.batches import collate_pairs

    device = torch.device(a.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)
    model = load_model(a.model, device, dtype) if a.model else build_random_model(a.shape, device, dtype)
    batch_pairs, prompt, answer = (int(x) for x in a.config.split("x"))
    pairs = synthetic_pairs(model.config.vocab_size, batch_pairs * (a.warmup + a.steps), prompt, answer, 7)
    batches = [collate_pairs(pairs, range(i * batch_pairs, (i + 1) * batch_pairs), 0)
               for i in range(a.warmup + a.steps)]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    step = _ours(model, device, a) if path == "ours" else _trl(model, device, a)
    losses, marks = [], []
    for i, batch in enumerate(batches):
        if i == a.warmup:
            if cuda:
                torch.cuda.synchronize(device)
            marks.append(mark(cuda))
        losses.append(step(batch))
        if i >= a.warmup:
            marks.append(mark(cuda))
    if cuda:
        torch.cuda.synchronize(device)
    times = [elapsed(x, y, cuda) for x, y in zip(marks, marks[1:])]
    out: dict[str, Any] = {"path": path, "pid": os.getpid(), "config": a.config, "device": str(device),
                           "dtype": str(dtype).removeprefix("torch."), "step_s": statistics.median(times),
                           "step_times_s": times, "losses": [float(x) for x in losses],
                           "pairs_per_s": batch_pairs / statistics.median(times)}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _ours(model: Any, device: torch.device, a: argparse.Namespace) -> Any:
    from qwenbook_bridge.engine.train.config import LoraSettings, PreferenceSettings, TrainConfig
    from qwenbook_bridge.engine.train.preference import PreferenceObjective
    from qwenbook_bridge.engine.train.step import StepRunner, build_optimizer
    from qwenbook_bridge.engine.train.trainable import Trainable, precision_plan

    cfg = TrainConfig(output_dir=tempfile.mkdtemp(), lora=LoraSettings(r=8, alpha=16, targets=PROJECTIONS),
                      gradient_checkpointing=True, lr=a.lr, preference=PreferenceSettings("dpo", beta=0.1))
    autocast, _, _ = precision_plan(cfg, model, device)
    trainable = Trainable(model, cfg, tokenizer=None, keep_original=False)
    torch.manual_seed(cfg.seed)
    trainable.prepare()
    objective = PreferenceObjective("dpo", 0.1, peft_model=trainable.peft_model)
    runner = StepRunner(trainable, build_optimizer(trainable.parameters(), cfg, device), device=device,
                        max_grad_norm=1.0, autocast=autocast, objective=objective)
    return lambda batch: runner([batch]).loss


def _trl(model: Any, device: torch.device, a: argparse.Namespace) -> Any:
    from peft import LoraConfig, get_peft_model
    from trl import DPOTrainer

    torch.manual_seed(42)  # the engine's default seed, so both paths start from the same LoRA initialization
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS, lora_dropout=0.0,
                                                  bias="none", task_type="CAUSAL_LM"))
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.enable_input_require_grads()
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=a.lr, fused=device.type == "cuda" or None)
    accelerator = SimpleNamespace(device=device, gather=lambda t: t, gather_for_metrics=lambda t: t,
                                  unwrap_model=lambda m: m)
    stand_in = SimpleNamespace(
        model=peft_model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=False,
        ref_model=None, args=SimpleNamespace(gradient_checkpointing_kwargs={"use_reentrant": False}),
        f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0], beta=0.1, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        label_smoothing=0.0)

    def step(batch: Any) -> torch.Tensor:
        b = batch.to(device)
        from qwenbook_bridge.engine.data.chat_encoding import IGNORE_INDEX

        inputs = {"input_ids": b.input_ids, "attention_mask": b.attention_mask,
                  "completion_mask": (b.labels != IGNORE_INDEX).long()}
        loss = DPOTrainer._compute_loss(stand_in, peft_model, inputs, return_outputs=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qwenbook_bridge.bench.preference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local model folder; default: random weights of --shape")
    p.add_argument("--shape", default="7b", help="7b, 0.5b or small (default 7b)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, the tiny model ($QWENBOOK_TINY_MODEL, else the small shape), 2x16x16 pairs, 2 steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--config", default="4x256x256", help="PAIRSxPROMPTxANSWER tokens per step (default 4x256x256)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {list(PATHS)}")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--out", default="qwenbook-bench-preference.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-result", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    a = parser().parse_args(args_list)
    if a.smoke:
        tiny = os.environ.get("QWENBOOK_TINY_MODEL")
        a.device, a.shape, a.config, a.warmup, a.steps = "cpu", "small", "2x16x16", 1, 1
        a.model = a.model or tiny
        args_list = [x for x in args_list if x != "--smoke"] + ["--device", "cpu", "--shape", "small", "--config",
                                                                "2x16x16", "--warmup", "1", "--steps", "1"]
        if a.model:
            args_list += ["--model", a.model]
    if a.child:
        Path(a.child_result).write_text(json.dumps(run_path(a.child, a)), encoding="utf-8")
        return 0
    report: dict[str, Any] = {"config": a.config, "shape": a.model or a.shape, "device": a.device, "runs": [],
                              "errors": []}
    for path in a.paths.split(","):
        if path not in PATHS:
            report["errors"].append(f"unknown path {path!r}; known: {', '.join(PATHS)}")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "qwenbook_bridge.bench.preference", *args_list, "--child", path,
                   "--child-result", str(result)]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0 or not result.is_file():
                report["errors"].append(f"{path}: exit {proc.returncode}: {proc.stdout[-2000:]}")
                continue
            report["runs"].append(json.loads(result.read_text(encoding="utf-8")))
    runs = {r["path"]: r for r in report["runs"]}
    if "trl" in runs and "ours" in runs:
        report["first_loss_diff"] = abs(runs["trl"]["losses"][0] - runs["ours"]["losses"][0])
        report["loss_max_abs_diff"] = max(abs(x - y) for x, y in zip(runs["trl"]["losses"], runs["ours"]["losses"]))
        report["speedup"] = runs["trl"]["step_s"] / runs["ours"]["step_s"]
    Path(a.out).write_text(json.dumps(report, indent=2), encoding="utf-8")
    for r in report["runs"]:
        peak = f", peak {r['peak_gib']:.2f} GiB" if "peak_gib" in r else ""
        print(f"{r['path']:>5}: {r['step_s'] * 1000:.1f} ms/step (median of {len(r['step_times_s'])}){peak}")
    for e in report["errors"]:
        print(f"error: {e}", file=sys.stderr)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
