"""Decode benchmark: transformers' own `generate` beside `FastDecoder`, same model, same process, same card.

    cd python-bridge && PYTHONPATH=. python -m qwenbook_bridge.bench --out bench.json
    python -m qwenbook_bridge.bench --small --device cpu        # seconds, for CI and laptops
    python -m qwenbook_bridge.bench --engine --tokenizer DIR --quant int8,int4   # also through the paged engine

Without `--model` it builds the Qwen2.5-7B shape (or a small one with `--small`) with random weights, so it
needs no download. It measures the device's copy bandwidth in the same run: batch-1 decode must read every
weight once per token (of an untied embedding table one row), so bandwidth / the bytes a step reads is the
ceiling the decode rate is judged against; an int8/int4 row against the bytes of its own quantized weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwenbook_bridge.bench.model import build_random_model, check_prompts, load_model, random_prompts, run_scenario
from qwenbook_bridge.engine.generate.fast_decode import FastDecoder
from qwenbook_bridge.bench.needs_gpu import require_cuda

VARIANTS: dict[str, dict[str, Any]] = {
    "eager": dict(cuda_graphs=False, compile=False),
    "graph": dict(cuda_graphs=True, compile=False),
    "compiled": dict(cuda_graphs=True, compile=True),
    "compiled-unfused": dict(cuda_graphs=True, compile=True, fuse_qkv=False),
    "compiled-sdpa": dict(cuda_graphs=True, compile=True, split_k_attention=False),
    "compiled-splitk": dict(cuda_graphs=True, compile=True, split_k_attention=True),
}


@dataclass
class BenchConfig:
    prompt_len: int = 512
    new_tokens: int = 256
    ttft_len: int = 2048
    batch_sizes: tuple[int, ...] = (8, 32)
    batch_new_tokens: int = 128
    check_prompts: int = 4
    check_tokens: int = 64
    repeats: int = 3


SMALL = BenchConfig(prompt_len=32, new_tokens=16, ttft_len=64, batch_sizes=(2, 4), batch_new_tokens=8,
                    check_prompts=2, check_tokens=16, repeats=1)


@dataclass
class Report:
    meta: dict[str, Any] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    correctness: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any]) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def step_read_bytes(model: Any) -> int:
    """Bytes one batch-1 decode step reads from the weights: each parameter and buffer once (an int8/int4 layer's
    codes and scales are buffers), except that of an input embedding table not shared with the output head it
    reads only the fed token's row. The ceiling is the copy bandwidth over this; the KV cache read is left out
    (~44 MB at 768 cached tokens of the 7B shape, 0.3% of its weights)."""
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() in seen:  # a tied head and table are one tensor
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    table, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None or head.weight.data_ptr() != table.data_ptr():
        total -= (table.shape[0] - 1) * table.shape[1] * table.element_size()
    return total


def quant_spec(spec: str) -> tuple[str, bool]:
    """--quant's "int8" / "int4" / "int8+head" / "int4+head" as (method, quantize the output layer too)."""
    method, plus, extra = spec.partition("+")
    if method not in ("int8", "int4") or (plus and extra != "head"):
        raise ValueError(f"--quant {spec!r}: use int8 or int4, optionally with +head (the output layer too)")
    return method, bool(plus)


def head_quality(model: Any, head_16bit: torch.Tensor, prompt: list[int]) -> dict[str, float]:
    """What quantizing the output layer alone costs, at every position of `prompt` on the model's own hidden
    states: mean KL(16-bit head || quantized head) in nats, top-1 agreement, and the largest logit error as a
    share of the logits' range."""
    ids = torch.tensor([prompt], device=head_16bit.device)
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0]
    ref = (hidden @ head_16bit.t()).float()
    got = model.get_output_embeddings()(hidden).float()
    log_ref, log_got = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (log_ref.exp() * (log_ref - log_got)).sum(-1)
    return {"positions": len(prompt), "head_mean_kl": kl.mean().item(), "head_max_kl": kl.max().item(),
            "head_top1_agreement": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
            "head_max_abs_error_share": ((got - ref).abs().max() / (ref.max() - ref.min())).item()}


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read plus bytes written per second by a large device-to-device copy (median of 10)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [_timed(device, lambda: dst.copy_(src)) for _ in range(10)]
    return 2 * n / _median(times)


def hf_generate(model: Any, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def _rate(device: torch.device, run: Callable[[int], Any], batch: int, new_tokens: int,
          repeats: int) -> dict[str, float]:
    """Decode tokens/s with prefill taken out: (N-1) steps over t(N tokens) - t(1 token), the same formula
    for both paths."""
    t_full = _median([_timed(device, lambda: run(new_tokens)) for _ in range(repeats)])
    t_first = _median([_timed(device, lambda: run(1)) for _ in range(repeats)])
    return {"tokens_per_s": batch * (new_tokens - 1) / max(t_full - t_first, 1e-9),
            "end_to_end_s": t_full, "first_token_s": t_first}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


class Bench:
    def __init__(self, model: Any, cfg: BenchConfig, variants: list[str], report: Report, out: Path) -> None:
        self.model, self.cfg, self.variants, self.report, self.out = model, cfg, variants, report, out
        self.device = next(model.parameters()).device
        self.vocab = model.config.vocab_size
        self.fp32_tokens: list[list[int]] = []
        self.rebuild: Callable[[], Any] = lambda: model  # set by main: the same model again in 16-bit
        self.fp32_margins: list[list[float]] = []
        self.batched_sizes: tuple[int, ...] = ()  # set by main unless batched scenarios are skipped
        self.profile_path: Path | None = None  # set by main with --profile: quantized variants are profiled too
        self.engine_rows = False  # set by main with --engine: rows through the paged chat engine too
        self.batched_variants: list[str] = variants  # the decoder variants timed at the batched sizes
        self.tokenizer: Any = None  # the engine's, from --tokenizer or --model

    def save(self) -> None:
        self.out.write_text(json.dumps(asdict(self.report), indent=2), encoding="utf-8")

    def guarded(self, what: str, fn: Callable[[], None]) -> None:
        run_scenario(what, fn, self.report.errors, self.device, self.save)

    def add(self, **row: Any) -> None:
        self.report.results.append(row)
        print(f"[bench] {json.dumps(row)}", flush=True)

    def hf_reference(self) -> list[tuple[list[int], list[int]]]:
        refs = []
        for prompt in check_prompts(self.vocab, self.cfg.check_prompts, self.cfg.prompt_len, seed=1):
            ids = torch.tensor([prompt], device=self.device)
            refs.append((prompt, hf_generate(self.model, ids, self.cfg.check_tokens)[0].tolist()))
        return refs

    def fp32_reference(self, refs: list[tuple[list[int], list[int]]]) -> None:
        """Greedy tokens of an fp32 copy of the model: the yardstick for how early bf16 rounding alone
        (in transformers' path as in ours) makes a random-weight model's near-tied argmax flip."""
        weight_bytes = self.report.meta["weight_bytes"]
        if next(self.model.parameters()).dtype == torch.float32:
            return
        if self.device.type == "cuda" and torch.cuda.mem_get_info(self.device)[0] < 3.2 * weight_bytes:
            print("[bench] not enough free device memory for an fp32 reference copy", file=sys.stderr)
            return
        ref = copy.deepcopy(self.model)
        for param in ref.parameters():
            param.data = param.data.float()
        for prompt, hf_tokens in refs:
            ids = torch.tensor([prompt], device=self.device)
            out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.cfg.check_tokens,
                               min_new_tokens=self.cfg.check_tokens, do_sample=False, pad_token_id=0,
                               output_scores=True, return_dict_in_generate=True)
            tokens = out.sequences[0, ids.shape[1]:].tolist()
            # How close to a tie fp32's choice was at each step: (top-1 - top-2) logit gap over the logits' spread.
            margins = [float((top[0] - top[1]) / step.float().std()) for step in out.scores
                       for top in [step[0].float().topk(2).values]]
            self.fp32_tokens.append(tokens)
            self.fp32_margins.append(margins)
            self.report.correctness.append(self._divergence("hf", prompt, hf_tokens, tokens, margins))
        del ref

    def _divergence(self, path: str, prompt: list[int], reference: list[int], tokens: list[int],
                    margins: list[float] | None) -> dict[str, Any]:
        at = first_divergence(reference, tokens)
        row: dict[str, Any] = {"path": path, "prompt_tokens": len(prompt), "compared_tokens": len(reference),
                               "first_divergence": at, "against": "hf" if margins is None else "hf-fp32"}
        if margins is not None and at is not None and at < len(margins):
            row["fp32_margin_at_divergence"] = margins[at]
            row["fp32_margin_rank"] = sum(m < margins[at] for m in margins)
        return row

    def run_hf(self) -> None:
        c, dev = self.cfg, self.device
        ids = torch.tensor(random_prompts(self.vocab, 1, c.prompt_len, seed=2), device=dev)
        hf_generate(self.model, ids[:, :16], 2)  # warm-up: kernels, allocator
        self.add(scenario="decode_b1", path="hf", **_rate(dev, lambda n: hf_generate(self.model, ids, n), 1,
                                                          c.new_tokens, 1))
        long_ids = torch.tensor(random_prompts(self.vocab, 1, c.ttft_len, seed=3), device=dev)
        ttft = _median([_timed(dev, lambda: hf_generate(self.model, long_ids, 1)) for _ in range(c.repeats)])
        self.add(scenario="ttft", path="hf", prompt_tokens=c.ttft_len, ttft_s=ttft)

    def run_ours(self, variant: str, refs: list[tuple[list[int], list[int]]]) -> None:
        c, dev = self.cfg, self.device
        max_len = max(c.prompt_len + c.new_tokens, c.ttft_len + 1, c.prompt_len + c.check_tokens)
        start = time.perf_counter()
        dec = FastDecoder(self.model, max_seq_len=max_len, batch_size=1, **VARIANTS[variant])
        ids = random_prompts(self.vocab, 1, c.prompt_len, seed=2)
        dec.generate(ids, c.new_tokens)  # warm-up: compiles and captures the graphs this scenario uses
        _sync(dev)
        self.add(scenario="setup", path=variant, warmup_s=time.perf_counter() - start)
        for i, (prompt, hf_tokens) in enumerate(refs):
            ours = dec.generate([prompt], c.check_tokens)[0]
            self.report.correctness.append(self._divergence(variant, prompt, hf_tokens, ours, None))
            if i < len(self.fp32_tokens):
                self.report.correctness.append(
                    self._divergence(variant, prompt, self.fp32_tokens[i], ours, self.fp32_margins[i]))
        self.add(scenario="decode_b1", path=variant, **_rate(dev, lambda n: dec.generate(ids, n), 1,
                                                             c.new_tokens, c.repeats))
        self._ttft(dec, variant)

    def _ttft(self, dec: FastDecoder, path: str) -> None:
        c = self.cfg
        long_ids = random_prompts(self.vocab, 1, c.ttft_len, seed=3)

        def first_token() -> None:
            next(iter(dec.stream(long_ids, 1)))

        first_token()
        ttft = _median([_timed(self.device, first_token) for _ in range(c.repeats)])
        self.add(scenario="ttft", path=path, prompt_tokens=c.ttft_len, ttft_s=ttft)

    def _batched_prompts(self, batch: int) -> list[list[int]]:
        return random_prompts(self.vocab, batch, self.cfg.prompt_len, seed=10 + batch)

    def _fast_batched(self, variant: str, batch: int) -> dict[str, float]:
        """Decode rate of `batch` sequences at once on one variant (warmed up first; freed on return)."""
        c = self.cfg
        prompts = self._batched_prompts(batch)
        dec = FastDecoder(self.model, max_seq_len=c.prompt_len + c.batch_new_tokens, batch_size=batch,
                          **VARIANTS[variant])
        dec.generate(prompts, c.batch_new_tokens)
        return _rate(self.device, lambda n: dec.generate(prompts, n), batch, c.batch_new_tokens, c.repeats)

    def run_engine(self, label: str) -> None:
        """Decode through the paged chat engine that the worker and the server run (a block cache, a graph captured
        per batch bucket, compiled layers on CUDA): batch 1 and the batched sizes, greedy and at full length,
        by the same formula as the decoder's rows. Prefix caching is off so that every run prefills."""
        from qwenbook_bridge.engine.generate.paged.scheduler import EngineConfig, PagedEngine
        from qwenbook_bridge.engine.generate.sampling import SamplingParams

        if self.tokenizer is None:
            raise ValueError("the engine rows need a tokenizer (it detokenizes as it streams): pass --tokenizer "
                             "with a Qwen tokenizer folder, or --model")
        c = self.cfg
        batches = [1, *self.batched_sizes]
        longest = max(c.new_tokens, c.batch_new_tokens)
        engine = PagedEngine(self.model, self.tokenizer,
                             EngineConfig(max_batch_size=max(batches), prefix_caching=False,
                                          context_length=c.prompt_len + longest + 1))
        engine.start()
        try:
            for b in batches:
                prompts = random_prompts(self.vocab, 1, c.prompt_len, seed=2) if b == 1 else self._batched_prompts(b)
                new = c.new_tokens if b == 1 else c.batch_new_tokens

                def run(n: int, prompts: list[list[int]] = prompts) -> None:
                    params = SamplingParams(max_tokens=n, greedy=True, ignore_eos=True)
                    handles = [engine.submit(p, params) for p in prompts]
                    for h in handles:
                        done = h.result(timeout=600)
                        if done.error or done.completion_tokens != n:
                            raise RuntimeError(f"the engine gave {done.completion_tokens} of {n} tokens "
                                               f"({done.finish_reason}): {done.error}")

                started = time.perf_counter()
                run(new)  # warm-up: compiles the layers and captures this bucket's graph
                self.add(scenario="setup", path=f"{label}-b{b}", warmup_s=time.perf_counter() - started)
                self.add(scenario=f"decode_b{b}", path=label, batch=b, **_rate(self.device, run, b, new, c.repeats))
        finally:
            engine.stop()

    def run_quantized(self, spec: str) -> None:
        """Decode on the same variants as 16-bit after quantizing the weights in place: int8 per channel, int4 in
        groups of 128; with "+head" (int8+head, int4+head) the output layer too, and its cost in quality beside.
        The model stays quantized until the next method, which starts again from the 16-bit weights."""
        from qwenbook_bridge.engine.quant.config import QuantConfig
        from qwenbook_bridge.engine.quant.quantize import quantize_model
        from qwenbook_bridge.engine.quant.layers import QuantizedLinear

        method, head = quant_spec(spec)
        if any(isinstance(m, QuantizedLinear) for m in self.model.modules()):
            self._restore_16bit()
        c, dev = self.cfg, self.device
        prompt = check_prompts(self.vocab, 1, c.prompt_len, seed=1)[0]
        head_16bit = self.model.get_output_embeddings().weight.detach().clone() if head else None
        started = time.perf_counter()
        summary = quantize_model(self.model, QuantConfig(method=method, group_size=128, include_lm_head=head))
        read = step_read_bytes(self.model)
        self.add(scenario="setup", path=spec, quantized_bytes=summary.quantized_bytes, step_read_bytes=read,
                 ceiling_tokens_per_s=self.report.meta["copy_bandwidth_gbps"] * 1e9 / read,
                 warmup_s=time.perf_counter() - started)
        if head_16bit is not None:
            self.add(scenario="head_quality", path=spec, **head_quality(self.model, head_16bit, prompt))
            del head_16bit
        ids = random_prompts(self.vocab, 1, c.prompt_len, seed=2)
        # Same quantized model through transformers' loop: the decoder must give its greedy tokens.
        reference = hf_generate(self.model, torch.tensor([prompt], device=dev), c.check_tokens)[0].tolist()
        variants = [v for v in self.variants if v != "eager"] or ["eager"]
        for variant in variants:
            path = f"{variant}-{spec}"
            dec = FastDecoder(self.model, max_seq_len=max(c.prompt_len + c.new_tokens, c.ttft_len + 1),
                              batch_size=1, **VARIANTS[variant])
            dec.generate(ids, c.new_tokens)
            self.add(scenario="decode_b1", path=path,
                     **_rate(dev, lambda n: dec.generate(ids, n), 1, c.new_tokens, c.repeats))
            tokens = dec.generate([prompt], c.check_tokens)[0]
            self.report.correctness.append(self._divergence(path, prompt, reference, tokens, None))
            self._ttft(dec, path)
            del dec
            if self.profile_path is not None:
                self.report.meta.setdefault("profile", []).append(
                    profile_decode(self.model, variant, c, self.profile_path, label=path))
            for b in self.batched_sizes if variant in self.batched_variants else ():
                self.add(scenario=f"decode_b{b}", path=path, batch=b, **self._fast_batched(variant, b))
        if self.engine_rows:
            self.run_engine(f"engine-{spec}")

    def _restore_16bit(self) -> None:
        import gc

        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        torch.manual_seed(0)  # the same random weights as the first build
        self.model = self.rebuild()

    def run_batched(self, batch: int, paths: list[str]) -> None:
        c, dev = self.cfg, self.device
        for path in paths:
            if path == "hf":
                ids = torch.tensor(self._batched_prompts(batch), device=dev)
                row = _rate(dev, lambda n: hf_generate(self.model, ids, n), batch, c.batch_new_tokens, 1)
            else:
                row = self._fast_batched(path, batch)
            self.add(scenario=f"decode_b{batch}", path=path, batch=batch, **row)


def profile_decode(model: Any, variant: str, cfg: BenchConfig, path: Path, label: str = "") -> dict[str, float]:
    """Kernel-time table for 32 decode steps of one variant: where a step's time goes, and how much of the
    step the device spends idle between kernels."""
    from torch.profiler import ProfilerActivity, profile

    device = next(model.parameters()).device
    steps = 32
    dec = FastDecoder(model, max_seq_len=cfg.prompt_len + steps + 1, batch_size=1, **VARIANTS[variant])
    ids = random_prompts(model.config.vocab_size, 1, cfg.prompt_len, seed=2)
    dec.generate(ids, steps)
    wall = _timed(device, lambda: dec.generate(ids, steps)) - _timed(device, lambda: dec.generate(ids, 1))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        dec.generate(ids, steps)
    _sync(device)
    averages = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = averages.table(sort_by=key, row_limit=40)
    kernel_us = sum(getattr(e, key, 0.0) for e in averages if device.type != "cuda" or e.device_type.name == "CUDA")
    summary = {"variant": label or variant, "steps": steps - 1, "wall_ms_per_step": 1000 * wall / (steps - 1),
               "device_ms_per_step_profiled": kernel_us / 1000 / steps}
    with path.open("a", encoding="utf-8") as f:
        f.write(f"== {label or variant}: {json.dumps(summary)}\n{table}\n\n")
    return summary


def summarize(report: Report) -> str:
    meta, rows = report.meta, report.results
    hf = {r["scenario"]: r for r in rows if r["path"] == "hf"}
    ceiling = meta.get("ceiling_tokens_per_s")
    # A quantized row is judged against the bytes its own step reads (its setup row's ceiling).
    ceilings = {r["path"]: r["ceiling_tokens_per_s"] for r in rows
                if r["scenario"] == "setup" and "ceiling_tokens_per_s" in r}
    lines = [f"card: {meta.get('card')}   torch {meta.get('torch')}   transformers {meta.get('transformers')}",
             f"weights: {meta.get('weight_bytes', 0) / 1e9:.2f} GB ({meta.get('parameters', 0) / 1e9:.2f} B params, "
             f"{meta.get('dtype')}); a step reads {meta.get('step_read_bytes', 0) / 1e9:.2f} GB   "
             f"copy bandwidth: {meta.get('copy_bandwidth_gbps', 0):.0f} GB/s   "
             f"batch-1 ceiling: {ceiling or 0:.1f} tokens/s"
             + "".join(f"; {m}: {c:.1f}" for m, c in ceilings.items()), "",
             f"{'scenario':<12}{'path':<18}{'tokens/s':>10}{'vs HF':>8}{'% ceiling':>11}{'TTFT ms':>10}"
             f"{'vs 16-bit':>11}"]
    sixteen = {(r["scenario"], r["path"]): r for r in rows}
    quantized = {spec for spec in ceilings if spec.partition("+")[0] in ("int8", "int4")}
    for r in rows:
        if r["scenario"] in ("setup", "head_quality"):
            continue
        tps, base = r.get("tokens_per_s"), hf.get(r["scenario"], {})
        ratio = ""
        if r["path"] != "hf" and tps and base.get("tokens_per_s"):
            ratio = f"{tps / base['tokens_per_s']:.2f}x"
        elif r["path"] != "hf" and r.get("ttft_s") and base.get("ttft_s"):
            ratio = f"{base['ttft_s'] / r['ttft_s']:.2f}x"
        variant, _, method = r["path"].rpartition("-")
        limit = ceilings.get(method, ceiling)
        pct = f"{100 * tps / limit:.0f}%" if tps and limit and r["scenario"] == "decode_b1" else ""
        ttft = f"{1000 * r['ttft_s']:.1f}" if "ttft_s" in r else ""
        rate = f"{tps:.1f}" if tps else ""
        base16 = sixteen.get((r["scenario"], variant), {}).get("tokens_per_s") if method in quantized else None
        vs16 = f"{tps / base16:.2f}x" if tps and base16 else ""
        lines.append(f"{r['scenario']:<12}{r['path']:<18}{rate:>10}{ratio:>8}{pct:>11}{ttft:>10}{vs16:>11}")
    for r in rows:
        if r["scenario"] == "setup":
            what = "quantize" if r["path"] in quantized else "compile + capture + first run"
            lines.append(f"setup {r['path']}: {what} {r['warmup_s']:.1f} s")
        elif r["scenario"] == "head_quality":
            lines.append(f"output layer {r['path']}: mean KL {r['head_mean_kl']:.2e} nats "
                         f"(max {r['head_max_kl']:.2e}), top-1 agreement {100 * r['head_top1_agreement']:.1f}% "
                         f"over {r['positions']} positions, largest error "
                         f"{100 * r['head_max_abs_error_share']:.2f}% of the logits' range")
    pairs: dict[tuple[str, str], list[str]] = {}
    for c in report.correctness:
        at = c["first_divergence"]
        margin = f" ({c['fp32_margin_at_divergence']:.3f})" if "fp32_margin_at_divergence" in c else ""
        pairs.setdefault((c["path"], c["against"]), []).append(
            f"{c['prompt_tokens']}:{'none' if at is None else at}/{c['compared_tokens']}{margin}")
    if pairs:
        lines.append("greedy tokens, first divergence per prompt (prompt tokens: position/compared, and against "
                     "fp32 the top-2 logit gap there in logit std units)")
    for (path, against), cells in pairs.items():
        lines.append(f"  {path} vs {against}: {'  '.join(cells)}")
    lines += [f"ERROR {e['scenario']}: {e['error']}" for e in report.errors]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwenbook_bridge.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local model folder; default: random weights in the Qwen2.5-7B shape")
    p.add_argument("--small", action="store_true", help="a small random model and short scenarios (CPU/CI)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--variants", default=None, help=f"comma list of {sorted(VARIANTS)}; default: graph,compiled "
                   "on CUDA, eager on CPU")
    p.add_argument("--batched-variants", help="variants for the batched scenarios (default: --variants; 'none' "
                   "for no decoder rows there, e.g. beside --engine)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: hf, check, batched")
    p.add_argument("--new-tokens", type=int, help="new tokens for the batch-1 scenario")
    p.add_argument("--batch-new-tokens", type=int, help="new tokens for the batched scenarios")
    p.add_argument("--batch-sizes", help="comma list, default 8,32")
    p.add_argument("--out", default="qwenbook-bench.json", help="where the JSON report goes")
    p.add_argument("--quant", default="", help="comma list of int8, int4, int8+head, int4+head: after the rest, "
                   "quantize the model in place (each from the 16-bit weights; +head: the output layer too, with "
                   "what that costs in quality) and time decode on the same variants as 16-bit")
    p.add_argument("--engine", action="store_true",
                   help="also decode through the paged chat engine the worker serves from, at batch 1 and the "
                   "batched sizes (and after each --quant method); with random weights it needs --tokenizer")
    p.add_argument("--tokenizer", help="a Qwen tokenizer folder for --engine with random weights")
    p.add_argument("--profile", action="store_true",
                   help="also write a kernel-time table per variant to <out>.profile.txt")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") or not (a.small or a.model):
        # The default model is Qwen2.5-7B-shaped: in fp32 on a CPU it would not fit, let alone finish.
        require_cuda("python -m qwenbook_bridge.bench", instead="`--small --device cpu` runs a small model on the CPU")
    device = torch.device(a.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    variants = (a.variants or ("graph,compiled" if device.type == "cuda" else "eager")).split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    for spec in filter(None, a.quant.split(",")):
        try:
            quant_spec(spec)
        except ValueError as e:
            p.error(str(e))
    cfg = SMALL if a.small else BenchConfig()
    overrides = {k: v for k, v in (("new_tokens", a.new_tokens), ("batch_new_tokens", a.batch_new_tokens)) if v}
    if a.batch_sizes:
        overrides["batch_sizes"] = tuple(int(x) for x in a.batch_sizes.split(","))
    cfg = BenchConfig(**{**asdict(cfg), **overrides})
    skip = set(filter(None, a.skip.split(",")))

    torch.manual_seed(0)
    report = Report()
    start = time.perf_counter()
    model = load_model(a.model, device, dtype) if a.model else build_random_model("small" if a.small else "7b",
                                                                                  device, dtype)
    model.eval()
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    read_bytes = step_read_bytes(model)
    bandwidth = copy_bandwidth(device)
    report.meta = {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "model": a.model or ("random Qwen2 small" if a.small else "random Qwen2.5-7B shape"),
        "dtype": str(dtype).removeprefix("torch."), "parameters": sum(t.numel() for t in model.parameters()),
        "weight_bytes": weight_bytes, "step_read_bytes": read_bytes, "copy_bandwidth_gbps": bandwidth / 1e9,
        "ceiling_tokens_per_s": bandwidth / read_bytes, "config": asdict(cfg), "variants": variants,
        "model_build_s": time.perf_counter() - start}
    bench = Bench(model, cfg, variants, report, Path(a.out))
    bench.rebuild = lambda: (load_model(a.model, device, dtype) if a.model else
                             build_random_model("small" if a.small else "7b", device, dtype)).eval()
    bench.batched_sizes = () if "batched" in skip else cfg.batch_sizes
    bench.engine_rows = a.engine
    bench.batched_variants = a.batched_variants.split(",") if a.batched_variants else variants
    if a.engine and (a.tokenizer or a.model):
        from transformers import AutoTokenizer

        bench.tokenizer = AutoTokenizer.from_pretrained(a.tokenizer or a.model)
    bench.save()
    refs: list[tuple[list[int], list[int]]] = []
    with torch.no_grad():
        if "check" not in skip:
            bench.guarded("hf_reference", lambda: refs.extend(bench.hf_reference()))
            bench.guarded("fp32_reference", lambda: bench.fp32_reference(refs))
        for v in variants:
            bench.guarded(f"ours_{v}", lambda v=v: bench.run_ours(v, refs))
        if a.engine:
            bench.guarded("engine", lambda: bench.run_engine("engine"))
        if "hf" not in skip:
            bench.guarded("hf", bench.run_hf)
        if "batched" not in skip:
            paths = [v for v in bench.batched_variants if v in VARIANTS] + ([] if "hf" in skip else ["hf"])
            for b in cfg.batch_sizes:
                bench.guarded(f"batched_{b}", lambda b=b: bench.run_batched(b, paths))
        if a.profile:
            prof_path = Path(a.out).with_suffix(".profile.txt")
            prof_path.write_text("", encoding="utf-8")
            bench.profile_path = prof_path
            # The un-graphed run shows each kernel's own time; the graphed ones show what is left between kernels.
            for v in dict.fromkeys(["eager", *variants]):
                bench.guarded(f"profile_{v}", lambda v=v: report.meta.setdefault("profile", []).append(
                    profile_decode(model, v, cfg, prof_path)))
        for spec in filter(None, a.quant.split(",")):
            bench.guarded(f"quant_{spec}", lambda spec=spec: bench.run_quantized(spec))
    report.meta["total_s"] = time.perf_counter() - start
    bench.save()
    print(summarize(report), flush=True)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
