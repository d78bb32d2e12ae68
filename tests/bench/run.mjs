#!/usr/bin/env node
// `npm run bench`: the notebook path (TypeScript -> ZeroMQ -> worker) against the same greedy generation
// called in-process in Python, in the same run on the same model, and the overhead per token.
//   npm run bench [-- --quick]   (--quick: fewer tokens, runs and clients; a check of the whole path in a minute or two)
import { spawnSync } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const repo = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const python = join(repo, ".venv", "bin", "python");
const model = process.env.QWENBOOK_BENCH_MODEL ?? join(repo, ".qwenbook", "models", "tiny-qwen2");
const prompt = "Write a short story about a lighthouse keeper.";
const { values: opts } = parseArgs({ options: { quick: { type: "boolean", default: false } } });
const maxTokens = Number(process.env.QWENBOOK_BENCH_TOKENS ?? (opts.quick ? 16 : 128));
const runs = Number(process.env.QWENBOOK_BENCH_RUNS ?? (opts.quick ? 2 : 5));

process.env.QWENBOOK_RUNTIME_DIR = mkdtempSync(join(tmpdir(), "qwenbook-bench-"));
process.env.QWENBOOK_PYTHON = python;
// One torch thread on both sides: the tiny model is too small to gain from more, and equal settings keep
// the comparison about the transport, not about thread scheduling.
const threads = process.env.QWENBOOK_BENCH_THREADS ?? "1";
process.env.OMP_NUM_THREADS = threads;
const { qwen } = await import("qwenbook");

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function viaWorker() {
  const m = await qwen.load(model, { dtype: "fp32", device: "cpu" });
  const results = [];
  for (let i = 0; i <= runs; i++) {
    const t0 = performance.now();
    let first = 0;
    let pieces = 0;
    const req = m.chat(prompt).greedy().maxTokens(maxTokens);
    for await (const _ of req.stream()) {
      if (pieces++ === 0) first = performance.now() - t0;
    }
    const total = performance.now() - t0;
    const reply = await req;
    if (i > 0) results.push({ ttft: first, total, tokens: reply.completionTokens });
  }
  return {
    ttft_ms: median(results.map((r) => r.ttft)),
    total_ms: median(results.map((r) => r.total)),
    tokens: results[0].tokens,
  };
}

function inProcess() {
  const r = spawnSync(python, ["-m", "qwenbook_bridge.bench.local", "--model", model, "--prompt", prompt,
    "--max-tokens", String(maxTokens), "--runs", String(runs), "--threads", threads, "--json"], { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`in-process bench failed: ${r.stderr}`);
  const out = JSON.parse(r.stdout.trim().split("\n").pop());
  return { ...out, total_ms: median(out.per_run.map((x) => x.duration_ms)) };
}

const local = inProcess();
const worker = await viaWorker();
await qwen.shutdown();
const workerTps = (worker.tokens / worker.total_ms) * 1000;
const overheadPerToken = (worker.total_ms - local.total_ms) / worker.tokens;
console.log(`model: ${model}, prompt ${JSON.stringify(prompt)}, ${maxTokens} new tokens, greedy, median of ${runs}`);
console.log("path                      ttft ms   tokens/s   total ms");
const localTps = (local.completion_tokens / local.total_ms) * 1000;
console.log(`in-process Python       ${local.ttft_ms.toFixed(2).padStart(8)} ${localTps.toFixed(1).padStart(10)} ${local.total_ms.toFixed(1).padStart(10)}`);
console.log(`TS -> ZeroMQ -> worker  ${worker.ttft_ms.toFixed(2).padStart(8)} ${workerTps.toFixed(1).padStart(10)} ${worker.total_ms.toFixed(1).padStart(10)}`);
console.log(`overhead: ${overheadPerToken.toFixed(3)} ms per token, throughput ratio worker/in-process ${(workerTps / localTps).toFixed(3)}`);

// ---------------------------------------------------------------- serving (tests/bench/serve.mjs)
// The OpenAI-compatible server on the same model: 1, 8 and 32 concurrent streaming clients, beside the
// static-batch decoder on the same prompts, in this run.
const { runServeBench } = await import("./serve.mjs");
console.log("\nserving: concurrent streaming OpenAI clients, beside the static-batch decoder");
runServeBench({ python, model, threads, maxTokens: Number(process.env.QWENBOOK_BENCH_SERVE_TOKENS ?? (opts.quick ? 8 : 64)),
  concurrency: opts.quick ? "1,4" : "1,8,32" });
