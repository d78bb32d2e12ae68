"""What a save or export cost and what it kept: file sizes, and for quantized forms perplexity and KL divergence.

Quality is measured on a short held-out text (built in, or the caller's) in windows of `max_length` tokens:
perplexity of the quantized model, perplexity of the unquantized reference, the mean per-token
KL(reference || quantized) in nats, and how often both pick the same top-1 token.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qwenbook_bridge.engine.files.save import format_bytes

# Written for this purpose, so no model has it memorised; English and Chinese because Qwen users use both.
DEFAULT_HELDOUT_TEXTS: tuple[str, ...] = (
    "The harbour town woke slowly. Fishing boats came in before the sun had cleared the hills, and the market "
    "stalls opened one by one: bread first, then fruit, then the fishmongers with their ice and their loud "
    "prices. By nine the square was full, and the old clock on the post office, which had been five minutes "
    "slow for as long as anyone could remember, struck the hour while the church bell answered a little later.",
    "To repot a plant, water it the day before so the roots hold together. Choose a pot one size larger with a "
    "drainage hole, add a layer of fresh soil, and lift the plant out by the base of its stem. Loosen circling "
    "roots with your fingers, set the plant at the same depth as before, fill the gaps, and water until it runs "
    "out of the bottom. Keep it out of strong sun for a week while the roots settle.",
    "def moving_average(values, window):\n    if window <= 0:\n        raise ValueError('window must be positive')\n"
    "    total = 0.0\n    out = []\n    for i, v in enumerate(values):\n        total += v\n        if i >= window:\n"
    "            total -= values[i - window]\n        out.append(total / min(i + 1, window))\n    return out\n",
    "周末的早晨，小区门口的早餐店排起了长队。老板一边揉面，一边和熟客聊天，问他们今天想吃油条还是包子。"
    "隔壁的水果摊刚刚到了一批橙子，摊主把它们堆成小山，还在旁边放了一块写着“今日特价”的纸板。"
    "孩子们背着书包跑过，准备去上周末的兴趣班。",
)


@dataclass
class FileSize:
    path: str
    bytes: int


@dataclass
class SizeReport:
    """Every file under a saved folder (or the one exported file) with its size."""

    root: str
    files: list[FileSize]
    total_bytes: int

    def table(self) -> str:
        width = max([len(f.path) for f in self.files] + [5])
        lines = [f"{f.path:<{width}}  {format_bytes(f.bytes):>10}" for f in self.files]
        lines.append(f"{'total':<{width}}  {format_bytes(self.total_bytes):>10}")
        return "\n".join(lines)


def size_report(path: str | os.PathLike[str]) -> SizeReport:
    p = Path(path)
    if p.is_file():
        files = [FileSize(p.name, p.stat().st_size)]
    elif p.is_dir():
        files = [FileSize(str(f.relative_to(p)), f.stat().st_size) for f in sorted(p.rglob("*")) if f.is_file()]
    else:
        raise FileNotFoundError(f"{p} does not exist")
    return SizeReport(str(p), files, sum(f.bytes for f in files))


@dataclass
class QualityReport:
    tokens: int
    perplexity: float
    reference_perplexity: float | None = None
    mean_kl: float | None = None
    top1_agreement: float | None = None
    text: str = "built-in held-out text"


@dataclass
class ExportReport:
    """What every save/export returns: where it went, what format, file sizes, and quality when measured."""

    path: str
    format: str
    sizes: SizeReport
    quality: QualityReport | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"{self.format} -> {self.path}", self.sizes.table()]
        q = self.quality
        if q is not None:
            parts = [f"perplexity {q.perplexity:.4g}"]
            if q.reference_perplexity is not None:
                parts.append(f"(unquantized {q.reference_perplexity:.4g})")
            if q.mean_kl is not None:
                parts.append(f"mean KL {q.mean_kl:.4g} nats")
            if q.top1_agreement is not None:
                parts.append(f"top-1 agreement {100 * q.top1_agreement:.1f}%")
            lines.append(" ".join(parts) + f" on {q.tokens} tokens of {q.text}")
        return "\n".join(lines)


LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def model_logits(model: torch.nn.Module) -> LogitsFn:
    """input_ids [1, T] -> float32 logits [T, V] from a transformers causal LM (or a PeftModel)."""
    def run(ids: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        out = model(input_ids=ids.to(device), use_cache=False)
        return out.logits[0].float().cpu()
    return run


def token_windows(tokenizer: Any, texts: Sequence[str] | None, max_length: int = 512) -> list[torch.Tensor]:
    """The texts joined by blank lines, tokenized without special tokens, cut into windows of `max_length`.

    One stream rather than one window per text: fewer, longer forward passes (the built-in text is one window).
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2 to predict anything")
    texts = DEFAULT_HELDOUT_TEXTS if texts is None else texts
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("held-out texts must be a list of strings")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    windows = [torch.tensor([ids[i:i + max_length]], dtype=torch.long) for i in range(0, len(ids), max_length)]
    windows = [w for w in windows if w.shape[1] >= 2]
    if not windows:
        raise ValueError("the held-out texts have fewer than 2 tokens: give longer texts")
    return windows


# The log-probabilities are taken a few rows at a time: over a whole window of a 152k-word vocabulary each
# temporary (log-softmax, exp, difference, product) is hundreds of MB, which the allocator maps fresh and the
# kernel faults in page by page for every op (seconds a window on a CPU); blocks of ~2 MB are reused instead.
_CHUNK_LOGITS = 1 << 19


@torch.no_grad()
def compare(candidate: LogitsFn, windows: Sequence[torch.Tensor], reference: LogitsFn | None = None,
            text: str = "built-in held-out text") -> QualityReport:
    """Perplexity of `candidate`, and against `reference`: perplexity, mean KL(reference || candidate), top-1 match."""
    nll = ref_nll = kl = 0.0
    agree = n_pred = 0
    for ids in windows:
        targets = ids[0, 1:, None]
        cand_logits = candidate(ids)[:-1]
        ref_logits = reference(ids)[:-1] if reference is not None else None
        rows = max(1, _CHUNK_LOGITS // cand_logits.shape[-1])
        for start in range(0, len(targets), rows):
            part = slice(start, start + rows)
            logp = F.log_softmax(cand_logits[part], dim=-1)
            nll += -logp.gather(1, targets[part]).sum().item()
            if ref_logits is not None:
                ref = F.log_softmax(ref_logits[part], dim=-1)
                ref_nll += -ref.gather(1, targets[part]).sum().item()
                kl += (ref.exp() * (ref - logp)).sum().item()
                agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
        n_pred += len(targets)
    report = QualityReport(tokens=n_pred, perplexity=math.exp(nll / n_pred), text=text)
    if reference is not None:
        report.reference_perplexity = math.exp(ref_nll / n_pred)
        report.mean_kl = kl / n_pred
        report.top1_agreement = agree / n_pred
    return report


def evaluate_quality(model: torch.nn.Module, tokenizer: Any, reference: torch.nn.Module | None = None,
                     texts: Sequence[str] | None = None, max_length: int = 512) -> QualityReport:
    """Quality of `model`, compared with `reference` (the unquantized model) when given."""
    windows = token_windows(tokenizer, texts, max_length)
    label = "built-in held-out text" if texts is None else f"{len(texts)} held-out text(s)"
    ref = model_logits(reference) if reference is not None else None
    with _eval_mode(model), _eval_mode(reference):
        return compare(model_logits(model), windows, ref, label)


WeightProvider = Callable[[str], "torch.Tensor | None"]


@contextmanager
def swapped_weights(model: torch.nn.Module, provider: WeightProvider) -> Iterator[None]:
    """Run `model` as if each module's `weight` (and a mixture-of-experts block's 3-D expert stacks) were
    `provider(name + '.' + key)` (when not None).

    The replacement exists only while its module runs (forward pre-hook in, forward hook out), so measuring a
    quantized form of a large model costs one extra weight of memory, not a second model.
    """
    handles = []
    for name, module in model.named_modules():
        keys = tuple(k for k, p in module._parameters.items() if p is not None and (k == "weight" or p.dim() == 3))
        if not keys:
            continue

        def pre(mod: torch.nn.Module, args: Any, name: str = name, keys: tuple[str, ...] = keys) -> None:
            saved = {}
            for key in keys:
                new = provider(f"{name}.{key}" if name else key)
                if new is not None:
                    param = mod._parameters[key]
                    saved[key] = param.data
                    param.data = new.to(device=param.device, dtype=param.dtype)
            if saved:
                mod._qwenbook_saved = saved  # type: ignore[assignment]

        def post(mod: torch.nn.Module, args: Any, out: Any) -> None:
            for key, data in mod.__dict__.pop("_qwenbook_saved", {}).items():
                mod._parameters[key].data = data

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _eval_mode(model: torch.nn.Module | None) -> Iterator[None]:
    if model is None:
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
