"""GPTQ rounding for int4 (Frantar et al., 2022): choose each weight's code knowing what the layer sees.

For every linear layer, H = 2 X^T X is gathered from its inputs on a small calibration set; columns are then
quantized left to right and each column's rounding error is pushed onto the columns not yet quantized, weighted
by the inverse Hessian, so the layer's output on the calibration data changes as little as possible. Decoder
layers are processed one after another, each fed with the outputs of the already-quantized layers before it.
Group scales follow the Q4_0 rule of quant.py, computed when the quantization reaches the group's first column.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwenbook_bridge.engine.quant.config import QuantConfig
from qwenbook_bridge.engine.quant.codes import int4_codes, int4_scales, pack_int4
from qwenbook_bridge.engine.quant.layers import make_quantized
from qwenbook_bridge.engine.files.save import Progress


def load_calibration_texts(source: Sequence[str] | str) -> list[str]:
    """Texts from a list, or from a file: .txt (paragraphs split by blank lines), .json (a list of strings or of
    objects with a "text" field) or .jsonl (one such object or string per line)."""
    if not isinstance(source, str):
        texts = [t for t in source if isinstance(t, str) and t.strip()]
        if len(texts) != len(list(source)):
            raise ValueError("calibration texts must be non-empty strings")
        return texts
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} does not exist")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
    elif path.suffix in (".json", ".jsonl"):
        items = json.loads(raw) if path.suffix == ".json" else [json.loads(l) for l in raw.splitlines() if l.strip()]
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of strings or of objects with a \"text\" field")
        texts = []
        for i, item in enumerate(items):
            text = item if isinstance(item, str) else item.get("text") if isinstance(item, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}: item {i} is neither a string nor an object with a \"text\" string")
            texts.append(text)
    else:
        raise ValueError(f"{path}: calibration files must be .txt, .json or .jsonl")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{path} holds no calibration text")
    return texts


@torch.no_grad()
def gptq_codes(w: torch.Tensor, h: torch.Tensor, group_size: int, damp: float, scale_dtype: torch.dtype,
               block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (packed codes [N, K/2], scales [N, K/group]) for weight w [N, K] given H [K, K]."""
    w = w.detach().float().clone()
    h = h.float().clone()
    n, k = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += torch.eye(k, device=h.device) * (damp * torch.mean(torch.diag(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n, k // group_size, dtype=scale_dtype, device=w.device)
    block = max(group_size, block - block % group_size)  # blocks hold whole groups
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                g = col // group_size
                scales[:, g] = int4_scales(w1[:, i:i + group_size], group_size)[:, 0].to(scale_dtype)
            s = scales[:, col // group_size : col // group_size + 1]
            q = int4_codes(w1[:, i:i + 1], s, 1)
            codes[:, col] = q[:, 0]
            deq = (q[:, 0].float() - 8) * s[:, 0].float()
            err = (w1[:, i] - deq) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return pack_int4(codes), scales


class _Stop(Exception):
    pass


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise NotImplementedError("GPTQ calibration needs a decoder-only model with a list of transformer layers")


def gptq_quantize(model: nn.Module, tokenizer: Any, config: QuantConfig, groups: dict[str, int],
                  tracker: Progress) -> int:
    """Quantize the linears named in `groups` (name -> group size) in place with GPTQ; returns calibration tokens."""
    if tokenizer is None:
        raise ValueError("GPTQ calibration needs the tokenizer to read the calibration texts")
    texts = load_calibration_texts(config.calibration)  # type: ignore[arg-type]
    samples = []
    for t in texts[: config.calibration_max_samples]:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"][: config.calibration_max_length]
        if ids:
            samples.append(torch.tensor([ids]))
    if not samples:
        raise ValueError("the calibration texts produced no tokens")
    device = next(model.parameters()).device
    layers = _decoder_layers(model)

    # Catch what the model feeds its first decoder layer: hidden states plus masks and rotary embeddings.
    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def catch(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs.append((args, kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ids in samples:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()

    names = {id(m): n for n, m in model.named_modules()}
    tracker.set_stage("calibrate")
    with torch.no_grad():
        for layer in layers:
            todo = {names[id(m)]: m for m in layer.modules() if names.get(id(m)) in groups}
            hessians = {n: torch.zeros(m.in_features, m.in_features, device=device) for n, m in todo.items()}
            counts = dict.fromkeys(todo, 0)

            def collect(name: str) -> Any:
                def hook(_m: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
                    x = args[0].reshape(-1, args[0].shape[-1]).float()
                    total = counts[name] + x.shape[0]
                    hessians[name].mul_(counts[name] / total).add_(x.t() @ x, alpha=2 / total)
                    counts[name] = total
                return hook

            hooks = [m.register_forward_hook(collect(n)) for n, m in todo.items()]
            try:
                for args, kwargs in inputs:
                    layer(*args, **kwargs)
            finally:
                for h in hooks:
                    h.remove()
            for name, lin in todo.items():
                g = groups[name]
                w = lin.weight
                cs = gptq_codes(w, hessians[name], g, config.damp, w.dtype)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, make_quantized(lin, config, g, cs))
                tracker.advance(w.numel() * w.element_size())
            del hessians
            # The next layer sees what this (now quantized) layer produces.
            new_inputs = []
            for args, kwargs in inputs:
                out = layer(*args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                if args:
                    new_inputs.append(((out, *args[1:]), kwargs))
                else:
                    new_inputs.append((args, {**kwargs, "hidden_states": out}))
            inputs = new_inputs
        # Linears outside the decoder layers (the output layer, if asked for) get plain rounding.
        for name, lin in list(model.named_modules()):
            if name in groups and type(lin) is nn.Linear:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, make_quantized(lin, config, groups[name]))
                tracker.advance(lin.weight.numel() * lin.weight.element_size())
    model.train(was_training)
    return sum(s.shape[1] for s in samples)
