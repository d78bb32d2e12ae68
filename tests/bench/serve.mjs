// The serving part of `npm run bench`: the OpenAI-compatible server on the same model under 1, 8 and 32
// concurrent streaming clients over HTTP (aggregate tokens/s, first-token and inter-token p50/p99, errors, the
// server's batch size), beside the static-batch decoder on the same prompts, in one run.
// python-bridge/tests/bench/serve_bench.py does the measuring; on a GPU run it directly for issue 19's figures:
//   .venv/bin/python python-bridge/tests/bench/serve_bench.py --random-weights --device cuda --json serve.json
import { spawnSync } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const repo = join(dirname(fileURLToPath(import.meta.url)), "..", "..");

/** Runs the serving benchmark on the CPU and prints its table; returns its JSON result. */
export function runServeBench({ python, model, threads, maxTokens = 64, concurrency = "1,8,32" }) {
  const script = join(repo, "python-bridge", "tests", "bench", "serve_bench.py");
  const args = [script, "--model", model, "--device", "cpu", "--dtype", "fp32", "--max-tokens", String(maxTokens),
    "--concurrency", concurrency, "--threads", String(threads)];
  const r = spawnSync(python, args, { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"], env: process.env });
  if (r.status !== 0) throw new Error(`serving benchmark failed (exit ${r.status}):\n${r.stdout}`);
  const lines = r.stdout.trim().split("\n");
  const result = JSON.parse(lines.pop());
  console.log(lines.join("\n"));
  return result;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const model = process.env.QWENBOOK_BENCH_MODEL ?? join(repo, ".qwenbook", "models", "tiny-qwen2");
  const threads = process.env.QWENBOOK_BENCH_THREADS ?? "1";
  runServeBench({ python: join(repo, ".venv", "bin", "python"), model, threads,
    maxTokens: Number(process.env.QWENBOOK_BENCH_SERVE_TOKENS ?? 64) });
}
