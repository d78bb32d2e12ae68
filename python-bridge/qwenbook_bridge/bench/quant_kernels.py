"""Per-matmul timing of the int8/int4 decode kernels on the Qwen2.5-7B projection shapes, beside bf16.

    cd python-bridge && PYTHONPATH=. python -m qwenbook_bridge.bench.quant_kernels --out kernels.json [--sweep]

Each path runs 20 times inside one CUDA graph (as in a captured decode step, so launch costs are what the
decoder pays), replayed 10 times; the median per call is reported with the bandwidth it reached. Calls cycle
through copies of the weights adding up to more than the L2 cache, so every call reads from memory as a
decode step does (a 7B int4 MLP matrix, 34 MB, would otherwise stay in an H200's 50 MB L2). `--sweep`
also tries a grid of tile sizes for the Triton kernels and reports the best beside `pick_config`'s choice.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qwenbook_bridge.engine.quant import triton_ops as quant_triton
from qwenbook_bridge.engine.quant.layers import Int4Linear
from qwenbook_bridge.engine.quant.codes import dequantize_int4, quantize_int4, quantize_int8
from qwenbook_bridge.bench.needs_gpu import require_cuda

SHAPES = {"q/o": (3584, 3584), "k/v": (512, 3584), "gate/up": (18944, 3584), "down": (3584, 18944)}
GROUP = 128


L2_FLUSH_BYTES = 256 * 2**20


def time_call(fn: Callable[[int], Any], calls: int = 20, replays: int = 10) -> float:
    """Seconds per call, from CUDA-graph replays; call i gets i (to pick a weight copy)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000 / calls)
    return sorted(times)[len(times) // 2]


def sweep_configs(method: str, rows: int) -> list[quant_triton.KernelConfig]:
    if rows == 1:
        grid = itertools.product((4, 8, 16), (512, 1024, 2048), (1, 4, 8), (2, 4, 8))
        configs = [quant_triton.KernelConfig(n, k, s, w) for n, k, s, w in grid]
        if method == "int4":  # one int4 kernel; int8 has a byte-reading and a word-reading one
            return configs
        return configs + [quant_triton.KernelConfig(c.block_n, c.block_k, c.split_k, c.num_warps, words=True)
                          for c in configs]
    ks = (128, 256) if method == "int8" else (GROUP,)
    grid = itertools.product((32, 64, 128), ks, (1, 2, 4, 8), (4, 8), (2, 3, 4))
    return [quant_triton.KernelConfig(n, k, s, w, num_stages=st) for n, k, s, w, st in grid]


def bench_shape(name: str, n: int, k: int, rows: int, sweep: bool) -> list[dict[str, Any]]:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(n, k, device=dev, generator=gen, dtype=torch.float32) * 0.02
    x = torch.randn(rows, k, device=dev, generator=gen).to(torch.bfloat16)
    wb = w.to(torch.bfloat16)
    q8, s8 = quantize_int8(w, torch.bfloat16)
    p4, s4 = quantize_int4(w, GROUP, torch.bfloat16)
    del w
    tiny = Int4Linear(k, n, False, GROUP, device="meta")
    tiny.qweight, tiny.scales = p4.clone(), s4.clone()
    tiny._pack_for("cuda")  # tinygemm's own layout
    sz = tiny._make_scale_zeros(s4, torch.bfloat16)
    ref8 = x.float() @ (q8.float() * s8.float()[:, None]).t()
    ref4 = x.float() @ dequantize_int4(p4, s4, torch.float32).t()

    def copies(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(-(-L2_FLUSH_BYTES // nbytes))]

    c16, c8, c4, ct = copies(wb), copies(q8, s8), copies(p4, s4), copies(tiny.qweight, sz)
    b16, b8, b4 = n * k * 2, n * k + n * 2, n * k // 2 + s4.numel() * 2
    paths: dict[str, tuple[Callable[[int], Any], int]] = {
        "bf16": (lambda i: F.linear(x, c16[i % len(c16)][0]), b16),
        "int8-dequant": (lambda i: x @ quant_triton.dequantize("int8", *c8[i % len(c8)], torch.bfloat16).t(), b8),
        "int8-triton": (lambda i: quant_triton.int8_matmul(x, *c8[i % len(c8)]), b8),
        "int4-dequant": (lambda i: x @ quant_triton.dequantize("int4", *c4[i % len(c4)], torch.bfloat16, GROUP).t(),
                         b4),
        "int4-tinygemm": (lambda i: torch.ops.aten._weight_int4pack_mm(x, ct[i % len(ct)][0], GROUP,
                                                                        ct[i % len(ct)][1]), b4),
        "int4-triton": (lambda i: quant_triton.int4_matmul(x, *c4[i % len(c4)], GROUP), b4),
    }
    rows_out = []
    for path, (fn, nbytes) in paths.items():
        secs = time_call(fn)
        row = {"shape": name, "n": n, "k": k, "rows": rows, "path": path, "us": secs * 1e6,
               "gbps": nbytes / secs / 1e9}
        if path.endswith("triton"):
            ref = ref8 if path.startswith("int8") else ref4
            row["max_rel_err"] = ((fn(0).float() - ref).abs().max() / ref.abs().max()).item()
            row["config"] = quant_triton.pick_config(path[:4], rows, n, k, GROUP).__dict__
        rows_out.append(row)
    if sweep:
        for method, call in (("int8", lambda c, i: quant_triton.int8_matmul(x, *c8[i % len(c8)], c)),
                             ("int4", lambda c, i: quant_triton.int4_matmul(x, *c4[i % len(c4)], GROUP, c))):
            nbytes = paths[f"{method}-triton"][1]
            best: tuple[float, Any] | None = None
            for cfg in sweep_configs(method, rows):
                try:
                    secs = time_call(lambda i, cfg=cfg: call(cfg, i), calls=16, replays=5)
                except Exception as e:  # noqa: BLE001 - a tile the compiler rejects (shared memory): skip it
                    print(f"skip {method} {cfg}: {type(e).__name__}", file=sys.stderr)
                    continue
                if best is None or secs < best[0]:
                    best = (secs, cfg)
            if best:
                rows_out.append({"shape": name, "n": n, "k": k, "rows": rows, "path": f"{method}-triton-best",
                                 "us": best[0] * 1e6, "gbps": nbytes / best[0] / 1e9, "config": best[1].__dict__})
    return rows_out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwenbook_bridge.bench.quant_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8,16,32", help="comma list of input rows")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-rows", default="1,8", help="the row counts --sweep tries tile sizes for")
    p.add_argument("--out", default="qwenbook-quant-kernels.json")
    a = p.parse_args(argv)
    require_cuda("python -m qwenbook_bridge.bench.quant_kernels",
                 instead="the CPU checks of these kernels are in python-bridge/tests/test_quant_triton.py")
    results = []
    sweep_rows = {int(r) for r in a.sweep_rows.split(",")}
    for rows in (int(r) for r in a.rows.split(",")):
        for name, (n, k) in SHAPES.items():
            results += bench_shape(name, n, k, rows, a.sweep and rows in sweep_rows)
            Path(a.out).write_text(json.dumps({"card": torch.cuda.get_device_name(), "results": results}, indent=1))
    for r in results:
        extra = f" err {r['max_rel_err']:.1e}" if "max_rel_err" in r else ""
        cfg = f" {r['config']}" if "config" in r else ""
        print(f"rows {r['rows']:>2} {r['shape']:>7} {r['path']:>18}: {r['us']:7.1f} us {r['gbps']:7.0f} GB/s{extra}{cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
