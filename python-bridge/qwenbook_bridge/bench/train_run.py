"""One path of the training benchmark on one scenario, in a process of its own (bench/train.py starts it).

A fresh process per path gives each a fresh CUDA context, allocator and compile cache, so no path pays for the
memory another left fragmented or the kernels another tuned. Every process builds the same random model from the
same seed, so every path starts from the same weights and the same LoRA initialization.

Step times are read from CUDA events recorded between steps (the host never waits inside the timed window, so a
path that queues work ahead keeps doing so); on the CPU from the wall clock.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwenbook_bridge.bench.step_marks import elapsed, mark
from qwenbook_bridge.bench.train_data import (
    hf_real_batches, ours_real_batches, pad_id_of, real_rows, synthetic_rows, trained_tokens)
from qwenbook_bridge.engine.data.chat_encoding import Example
from qwenbook_bridge.engine.train.batches import collate
from qwenbook_bridge.engine.train.config import LoraSettings, TrainConfig
from qwenbook_bridge.engine.train.graphed_step import GraphedStep, graphable
from qwenbook_bridge.engine.train.step import StepRunner, build_optimizer
from qwenbook_bridge.engine.train.trainable import Trainable, decoder_layers, precision_plan

PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
# hf-trainer is a real transformers.Trainer, run once to check that `hf` steps as fast as it does.
# ours-int4*: QLoRA, the engine's step over an int4 base (group 128, rounded to nearest; embeddings and the output
# layer stay bf16), as `qwen.load(id, { quant: "int4" })` then `.lora()` trains it.
PATHS = ("hf", "liger", "ours", "ours-compiled", "ours-int4", "ours-int4-compiled", "hf-trainer")
StepFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Job:
    scenario: str          # "4x384" (synthetic) or "real-4x384"
    path: str
    repeat: int
    warmup: int
    steps: int
    r: int
    alpha: float
    dropout: float
    lr: float
    seed: int
    profile: Path | None
    tokenizer: str | None
    data_dir: Path
    real_rows: int
    # Experiments on the engine's paths: decoder layers (the last ones) left out of gradient checkpointing, and the
    # torch.compile mode ("" = default).
    keep_layers: int = 0
    compile_mode: str = ""
    cuda_graphs: str = "auto"  # replay the engine's steps from a CUDA graph: on, off, auto (= the compiled paths)
    activation_memory: float | None = None  # TrainConfig.activation_memory_gb (None: the engine's default)

    @property
    def real(self) -> bool:
        return self.scenario.startswith("real-")

    @property
    def shape(self) -> tuple[int, int]:
        batch, length = self.scenario.removeprefix("real-").split("x")
        return int(batch), int(length)


class Unavailable(Exception):
    """The path cannot run here (a package missing); the row says why instead of leaving a gap."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    def __init__(self, model: Any, job: Job) -> None:
        self.model, self.job = model, job
        self.device = next(model.parameters()).device
        self.vocab = model.config.vocab_size
        self._tokenizer: Any = None

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            if not self.job.tokenizer:
                raise ValueError("the real-data scenario needs --tokenizer (a folder with a Qwen tokenizer and its "
                                 "chat template, e.g. .qwenbook/models/tiny-qwen2)")
            self._tokenizer = AutoTokenizer.from_pretrained(self.job.tokenizer)
        return self._tokenizer

    def rows(self) -> list[Example]:
        batch, length = self.job.shape
        if self.job.real:
            return real_rows(self.tokenizer(), self.job.data_dir, self.job.real_rows, length, self.job.seed)
        # Each synthetic scenario has rows of its own, the same in every process.
        seed = self.job.seed + batch * 100_003 + length
        return synthetic_rows(self.vocab, batch * (self.job.warmup + self.job.steps + 3), length, seed)

    def measure(self, step: StepFn, tokens: list[int], trained: list[int],
                examples: list[list[int]] | None) -> dict[str, Any]:
        """Warm-up steps, then timed steps; losses and norms stay on the device until the end."""
        n_warm, n = self.job.warmup, self.job.steps
        losses: list[torch.Tensor] = []
        norms: list[torch.Tensor] = []
        for i in range(n_warm):
            loss, norm = step(i)
            losses.append(loss)
            norms.append(norm)
        _sync(self.device)
        cuda = self.device.type == "cuda"
        marks: list[Any] = []
        wall = time.perf_counter()
        for i in range(n_warm, n_warm + n):
            marks.append(mark(cuda))
            loss, norm = step(i)
            losses.append(loss)
            norms.append(norm)
        marks.append(mark(cuda))
        _sync(self.device)
        wall = time.perf_counter() - wall
        step_s = [elapsed(a, b, cuda) for a, b in zip(marks, marks[1:])]
        timed = slice(n_warm, n_warm + n)
        return {"step_s": step_s, "window_s": wall, "tokens": tokens[timed], "trained_tokens": trained[timed],
                "warmup_tokens": sum(tokens[:n_warm]), "examples": None if examples is None else examples[timed],
                "losses": torch.stack(losses).float().tolist(), "grad_norms": torch.stack(norms).float().tolist()}

    def profile(self, step: StepFn, first: int) -> None:
        from qwenbook_bridge.bench.train_profile import profile_steps

        assert self.job.profile is not None
        profile_steps(step, first, 3, self.device, self.job.profile, f"{self.job.scenario} {self.job.path}")

    # --- Hugging Face + peft, as a tutorial's Trainer runs it ---------------------------------------------

    def hf_batches(self, rows: list[Example]) -> tuple[list[dict[str, torch.Tensor]], list[list[int]] | None]:
        """The batches and, for real rows, each step's example indices (into `rows`)."""
        batch, _ = self.job.shape
        n = self.job.warmup + self.job.steps + (3 if self.job.profile else 0)
        if self.job.real:
            return hf_real_batches(rows, batch, n, self.tokenizer(), self.job.seed)
        return [{"input_ids": torch.tensor([r.input_ids for r in rows[i * batch:(i + 1) * batch]]),
                 "labels": torch.tensor([r.labels for r in rows[i * batch:(i + 1) * batch]])}
                for i in range(min(n, len(rows) // batch))], None

    def run_hf(self, rows: list[Example], liger: bool) -> dict[str, Any]:
        from peft import LoraConfig, get_peft_model

        if liger:
            apply_liger = liger_patch()
            apply_liger(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=True, model=self.model)
        host, examples = self.hf_batches(rows)
        batches = [{k: v.to(self.device) for k, v in b.items()} for b in host]
        torch.manual_seed(self.job.seed)
        model = get_peft_model(self.model, LoraConfig(
            r=self.job.r, lora_alpha=self.job.alpha, lora_dropout=self.job.dropout, target_modules=PROJECTIONS,
            bias="none", task_type="CAUSAL_LM"))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        # transformers' Trainer defaults to optim="adamw_torch_fused" (fused AdamW on CUDA).
        optimizer = torch.optim.AdamW(params, lr=self.job.lr, weight_decay=0.0,
                                      fused=True if self.device.type == "cuda" else None)

        def step(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            loss = model(**batches[i], use_cache=False).loss
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach(), norm.detach()

        tokens = [int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches]
        result = self.measure(step, tokens, [trained_tokens(b["labels"]) for b in batches], examples)
        if self.job.profile:
            self.profile(step, self.job.warmup + self.job.steps)
        return result

    def run_trainer(self, rows: list[Example]) -> dict[str, Any]:
        """A real transformers.Trainer on the same batches: its step times, to check `hf` against."""
        from peft import LoraConfig, get_peft_model
        from transformers import Trainer, TrainerCallback, TrainingArguments

        batch, _ = self.job.shape
        batches, _ = self.hf_batches(rows)
        features = [{k: v[j] for k, v in b.items()} for b in batches for j in range(v_rows(b))]
        torch.manual_seed(self.job.seed)
        model = get_peft_model(self.model, LoraConfig(
            r=self.job.r, lora_alpha=self.job.alpha, lora_dropout=self.job.dropout, target_modules=PROJECTIONS,
            bias="none", task_type="CAUSAL_LM"))
        cuda = self.device.type == "cuda"
        marks: list[Any] = []

        class Marks(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                marks.append(mark(cuda))

            def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                marks.append(mark(cuda))

        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(
                output_dir=tmp, per_device_train_batch_size=batch, max_steps=self.job.warmup + self.job.steps,
                learning_rate=self.job.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                logging_steps=10_000, save_strategy="no", report_to=[], seed=self.job.seed,
                dataloader_pin_memory=cuda, use_cpu=not cuda, remove_unused_columns=False)
            # The rows are already padded per batch; keep the batches as they are (no shuffle, no re-collation).
            trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=_stack)
            trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(features)  # type: ignore
            trainer.add_callback(Marks())
            trainer.train()
        _sync(self.device)
        step_s = [elapsed(a, b, cuda) for a, b in zip(marks, marks[1:])][self.job.warmup:]
        timed = batches[self.job.warmup:self.job.warmup + self.job.steps]
        return {"step_s": step_s, "window_s": sum(step_s),
                "tokens": [int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                           for b in timed],
                "trained_tokens": [trained_tokens(b["labels"]) for b in timed], "losses": [], "grad_norms": []}

    # --- the engine's step, as train() runs it ------------------------------------------------------------

    def run_ours(self, rows: list[Example], compiled: bool) -> dict[str, Any]:
        batch, length = self.job.shape
        cfg = TrainConfig(output_dir="-", lora=LoraSettings(r=self.job.r, alpha=self.job.alpha,
                                                            dropout=self.job.dropout),
                          max_length=length, batch_size=batch, grad_accum=1, lr=self.job.lr, schedule="constant",
                          gradient_checkpointing=True, packing=True, compile=compiled and not self.job.compile_mode,
                          seed=self.job.seed, activation_memory_gb=self.job.activation_memory)
        cfg.validate()
        autocast, use_scaler, _ = precision_plan(cfg, self.model, self.device)
        n = self.job.warmup + self.job.steps + (3 if self.job.profile else 0)
        if self.job.real:
            host, examples = ours_real_batches(rows, batch, n, length, pad_id_of(self.tokenizer()), self.job.seed)
        else:
            units = [[i] for i in range(len(rows))]
            host = [collate(rows, units, range(i * batch, (i + 1) * batch), 0, True)
                    for i in range(min(n, len(rows) // batch))]
            examples = None
        batches = [b.to(self.device) for b in host]
        trainable = Trainable(self.model, cfg, tokenizer=None)
        torch.manual_seed(self.job.seed)
        trainable.prepare()
        layers = decoder_layers(self.model)
        for layer in layers[len(layers) - self.job.keep_layers:] if self.job.keep_layers else []:
            layer.gradient_checkpointing = False  # keeps its activations: no recompute, more memory
        if compiled and self.job.compile_mode:
            for layer in layers:
                layer.compile(mode=self.job.compile_mode)
        optimizer = build_optimizer(trainable.parameters(), cfg, self.device)
        runner = StepRunner(trainable, optimizer, device=self.device, max_grad_norm=cfg.max_grad_norm,
                            autocast=autocast, scaler=torch.amp.GradScaler(self.device.type) if use_scaler else None)

        graphed = None
        if self.job.cuda_graphs == "on" or (self.job.cuda_graphs == "auto" and compiled):
            # auto: as train() decides, sizes included; on: whenever a capture is possible at all.
            sizes = dict(step_tokens=cfg.micro_batch_tokens, hidden=self.model.config.hidden_size) \
                if self.job.cuda_graphs == "auto" else {}
            why_not = graphable(runner, grad_accum=1, dropout=self.job.dropout, **sizes)
            if why_not and self.job.cuda_graphs == "on":
                raise Unavailable(f"CUDA graphs: {why_not}")
            if not why_not:
                graphed = GraphedStep(runner, warmup=max(1, self.job.warmup - 1))

        def step(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            stats = graphed(batches[i]) if graphed is not None else runner([batches[i]])
            return stats.loss, stats.grad_norm

        result = self.measure(step, [b.tokens for b in host], [b.targets for b in host], examples)
        if trainable.checkpoint_plan is not None:
            result["selective_checkpointing"] = {"layers": trainable.checkpoint_plan.selective,
                                                 "wide": trainable.checkpoint_plan.wide,
                                                 "extra_gib": trainable.checkpoint_plan.extra_bytes / 2**30}
        if graphed is not None:  # how many graphs replayed the timed steps, or why none could be captured
            result["cuda_graphs"] = {"graphs": len(graphed.graphs), "failed": graphed.failed}
        if self.job.profile:
            self.profile(step, self.job.warmup + self.job.steps)
        return result

    def fp32_first_loss(self, rows: list[Example]) -> dict[str, Any]:
        """The first batch's loss from an fp32 copy of the model (LoRA B starts at zero, so every path's first
        loss is this loss up to rounding)."""
        batch, _ = self.job.shape
        model = self.model.float()
        with torch.no_grad():
            ids = torch.tensor([r.input_ids for r in rows[:batch]], device=self.device)
            labels = torch.tensor([r.labels for r in rows[:batch]], device=self.device)
            return {"fp32_first_loss": float(model(input_ids=ids, labels=labels, use_cache=False).loss)}

    def run(self) -> dict[str, Any]:
        rows = self.rows()
        path = self.job.path
        if path == "fp32-reference":
            return self.fp32_first_loss(rows)
        if path in ("hf", "liger"):
            return self.run_hf(rows, liger=path == "liger")
        if path == "hf-trainer":
            return self.run_trainer(rows)
        return self.run_ours(rows, compiled=path.endswith("-compiled"))


def liger_patch() -> Any:
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2
    except Exception as exc:  # noqa: BLE001 - any import failure makes the row say why
        raise Unavailable(f"liger_kernel is not importable ({type(exc).__name__}: {exc})") from None
    return apply_liger_kernel_to_qwen2


def v_rows(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0])


def _stack(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([f[k] for f in features]) for k in features[0]}


def run_job(job: Job, model_dir: str | None, shape: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Build the model, run the job's path, and return the process's part of the report."""
    from qwenbook_bridge.bench.model import build_random_model, load_model

    if device.type == "cuda":
        # cuDNN's attention was seen building a new plan for every shape on the benchmark machine.
        torch.backends.cuda.enable_cudnn_sdp(False)
    out: dict[str, Any] = {"scenario": job.scenario, "path": job.path, "repeat": job.repeat, "pid": os.getpid()}
    if job.path == "liger":
        try:  # before the model is built: a path that cannot run costs no device time
            liger_patch()
        except Unavailable as exc:
            return {**out, "unavailable": str(exc)}
    started = time.perf_counter()
    torch.manual_seed(0)
    model = load_model(model_dir, device, dtype) if model_dir else build_random_model(shape, device, dtype)
    if job.path.startswith("ours-int4"):
        from qwenbook_bridge.engine.quant.config import QuantConfig
        from qwenbook_bridge.engine.quant.quantize import quantize_model

        quantize_model(model, QuantConfig("int4", 128))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["model_build_s"] = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        out["weights_gib"] = torch.cuda.memory_allocated(device) / 2**30
    try:
        out.update(Runner(model, job).run())
    except Unavailable as exc:
        out["unavailable"] = str(exc)
        print(f"[bench] {job.scenario} {job.path}: {exc}", file=sys.stderr, flush=True)
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out
