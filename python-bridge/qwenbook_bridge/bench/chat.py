"""Chat as a notebook runs it: `engine.generate` on a loaded model folder, the plain loop beside the fast decoder.

    cd python-bridge && PYTHONPATH=. python -m qwenbook_bridge.bench.chat --tokenizer DIR --out chat.json
    python -m qwenbook_bridge.bench.chat --model DIR [--quant int8,int4]

`bench/decode.py` times the decoders on token ids; this times the product path (chat template, the engine's loader,
streaming detokenization, the fast decoder chosen by QWENBOOK_FAST_DECODE) and checks both loops give the same
reply. Without `--model` it writes the Qwen2.5-7B shape with random weights and the given tokenizer to a
temporary folder first (no hub needed). Each `--quant` method loads the folder again quantized.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from qwenbook_bridge.bench.needs_gpu import require_cuda

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def write_random_model(tokenizer: Path, into: Path) -> Path:
    from qwenbook_bridge.bench.model import build_random_model, copy_tokenizer

    model = build_random_model("7b", torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16)
    model.save_pretrained(into)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # Only the tokenizer's files: a tokenizer folder that is a model (the tiny test model) would otherwise put its
    # config and weights over the random 7B ones, and the benchmark would time the tiny model.
    return copy_tokenizer(tokenizer, into)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def time_loops(folder: Path, quant: str | None, max_tokens: int, runs: int) -> list[dict[str, Any]]:
    from qwenbook_bridge.engine import LoadOptions, SamplingParams, load_model
    from qwenbook_bridge.engine.generate.generation import generate
    from qwenbook_bridge.engine.generate.decoders import forget

    cuda = torch.cuda.is_available()
    loaded = load_model(str(folder), LoadOptions(dtype="bf16" if cuda else "fp32", device="cuda" if cuda else "cpu",
                                                 quant={"method": quant, "group_size": 128} if quant else None))
    messages = [{"role": "user", "content": PROMPT}]
    opts = SamplingParams(max_tokens=max_tokens, greedy=True)
    rows, tokens = [], {}
    saved = os.environ.get("QWENBOOK_FAST_DECODE")
    for loop, flag in (("plain", "0"), ("fast", "1")):
        os.environ["QWENBOOK_FAST_DECODE"] = flag
        try:
            generate(loaded, messages, opts, on_token=lambda _d: None)  # warm-up (captures the graphs)
            results = [generate(loaded, messages, opts, on_token=lambda _d: None) for _ in range(runs)]
        finally:
            if saved is None:
                os.environ.pop("QWENBOOK_FAST_DECODE", None)
            else:
                os.environ["QWENBOOK_FAST_DECODE"] = saved
        best = max(results, key=lambda r: r.tokens_per_s)
        tokens[loop] = best.token_ids
        rows.append({"loop": loop, "quant": quant or "none", "dtype": loaded.info.get("dtype"), "prompt_tokens": best.prompt_tokens,
                     "completion_tokens": best.completion_tokens,
                     "tokens_per_s": sorted(r.tokens_per_s for r in results)[len(results) // 2],
                     "ttft_ms": sorted(r.ttft_ms for r in results)[len(results) // 2]})
    rows[-1]["first_divergence_from_plain"] = first_divergence(tokens["plain"], tokens["fast"])
    rows[-1]["speedup"] = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    forget(loaded.model)
    del loaded
    if cuda:
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwenbook_bridge.bench.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a saved model folder (default: random Qwen2.5-7B shape, needs --tokenizer)")
    p.add_argument("--tokenizer", help="folder with tokenizer.json / tokenizer_config.json for the random model")
    p.add_argument("--quant", default="", help="comma list of int8, int4 to time after 16-bit")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default="qwenbook-chat-bench.json")
    a = p.parse_args(argv)
    if not a.model and not a.tokenizer:
        p.error("pass --model DIR, or --tokenizer DIR to build the random 7B shape")
    if not a.model:
        # The random model is Qwen2.5-7B-shaped: in fp32 on a CPU it would not fit, let alone finish.
        require_cuda("python -m qwenbook_bridge.bench.chat", instead="`--model DIR` times a small saved model on the CPU")
    with tempfile.TemporaryDirectory(prefix="qwenbook-chat-bench-") as tmp:
        folder = Path(a.model) if a.model else write_random_model(Path(a.tokenizer), Path(tmp))
        rows: list[dict[str, Any]] = []
        for quant in [None, *filter(None, a.quant.split(","))]:
            rows += time_loops(folder, quant, a.max_tokens, a.runs)
            Path(a.out).write_text(json.dumps({"card": torch.cuda.get_device_name() if torch.cuda.is_available()
                                               else "cpu", "rows": rows}, indent=1), encoding="utf-8")
    for r in rows:
        print(f"{r['quant']:>5} {r['dtype']} {r['loop']:>5}: {r['tokens_per_s']:8.1f} tokens/s, first token {r['ttft_ms']:.1f} ms"
              + (f", {r['speedup']:.2f}x plain, first divergence {r['first_divergence_from_plain']}"
                 if r["loop"] == "fast" else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
