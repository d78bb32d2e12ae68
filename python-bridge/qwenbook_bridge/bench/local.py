"""Time the engine's greedy generation in-process: the baseline that the notebook path (TypeScript -> ZeroMQ ->
worker) is measured against.

    python -m qwenbook_bridge.bench.local --model DIR --prompt TEXT --max-tokens N --runs K [--json]

One warm-up run, then K timed runs; prints the median time-to-first-token and decode speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any


def bench(model: str, prompt: str, max_tokens: int, runs: int, device: str = "auto", dtype: str = "auto",
          system: str | None = None) -> dict[str, Any]:
    from qwenbook_bridge.engine import LoadOptions, SamplingParams, load_model
    from qwenbook_bridge.engine.generate.generation import generate

    loaded = load_model(model, LoadOptions(dtype=dtype, device=device))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    opts = SamplingParams(max_tokens=max_tokens, greedy=True)

    def stream(_delta: Any) -> None:
        pass  # the worker streams every delta; do the same work here

    generate(loaded, messages, opts, on_token=stream)
    results = [generate(loaded, messages, opts, on_token=stream) for _ in range(runs)]
    ttft = statistics.median(r.ttft_ms for r in results)
    speed = statistics.median(r.tokens_per_s for r in results)
    return {
        "model": loaded.model_id,
        "device": str(loaded.device),
        "dtype": loaded.info["dtype"],
        "runs": runs,
        "prompt_tokens": results[0].prompt_tokens,
        "completion_tokens": results[0].completion_tokens,
        "ttft_ms": round(ttft, 3),
        "tokens_per_s": round(speed, 3),
        "ms_per_token": round(1000.0 / speed, 4) if speed else None,
        "text": results[0].text,
        "token_ids": results[0].token_ids,
        "per_run": [{"ttft_ms": r.ttft_ms, "tokens_per_s": r.tokens_per_s, "duration_ms": r.duration_ms}
                    for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwenbook_bridge.bench.local", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder or hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")
    a = p.parse_args(argv)
    if a.runs < 1 or a.max_tokens < 1:
        p.error("--runs and --max-tokens must be at least 1")
    from qwenbook_bridge.engine import EngineError

    if a.threads is not None:
        import torch

        torch.set_num_threads(max(1, a.threads))
    try:
        report = bench(a.model, a.prompt, a.max_tokens, a.runs, a.device, a.dtype, a.system)
    except EngineError as e:
        print(f"bench_local: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(f"in-process {report['model']}: {report['completion_tokens']} tokens after a {report['prompt_tokens']}-token "
              f"prompt, median of {a.runs} runs: time to first token {report['ttft_ms']:.2f} ms, "
              f"{report['tokens_per_s']:.1f} tokens/s ({report['ms_per_token']:.3f} ms/token)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
