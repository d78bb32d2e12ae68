// llama.cpp's side of bench/cpu.py: a GGUF file through node-llama-cpp on the CPU, one prompt of token ids,
// greedy, timed as the engine times a reply (GenerationResult): first token from the call, decode tokens/s over
// the tokens after the first. Prints JSON on stdout.
//
// Input (a JSON file, the only argument): { "model": "<path.gguf>", "prompt": [ids...], "threads": 2,
//                                           "maxTokens": 64, "runs": 3 }
// Output: { "version", "threads" (what the context ran with), "load_s", "runs": [{ "ttft_ms", "tokens_per_s", "tokens": [ids...] }] }
// One warm-up run first; the sequence is emptied before each run, so every first token pays the whole prefill.
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

function packageVersion() {
  let dir = dirname(fileURLToPath(import.meta.resolve("node-llama-cpp")));
  while (!existsSync(join(dir, "package.json")) && dirname(dir) !== dir) dir = dirname(dir);
  return JSON.parse(readFileSync(join(dir, "package.json"), "utf8")).version;
}

const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
const started = performance.now();
// maxThreads 0: no pool shared with other contexts, so the context gets exactly the threads it asks for.
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error, maxThreads: 0 });
const model = await llama.loadModel({ modelPath: spec.model });
const context = await model.createContext({
  contextSize: Math.max(256, spec.prompt.length + spec.maxTokens + 16),
  threads: { ideal: spec.threads, min: spec.threads },
});
const seq = context.getSequence();
const loadS = (performance.now() - started) / 1000;

async function once(maxTokens) {
  await seq.clearHistory();
  const tokens = [];
  const t0 = performance.now();
  let first = 0;
  let last = 0;
  // Temperature 0 is greedy (argmax), no repeat penalty; end tokens are yielded like any other, as the engine's
  // rows ignore them here, so every reply has maxTokens tokens.
  for await (const token of seq.evaluate(spec.prompt, { temperature: 0, yieldEogToken: true })) {
    last = performance.now();
    if (tokens.length === 0) first = last;
    tokens.push(token);
    if (tokens.length >= maxTokens) break;
  }
  const decodeS = (last - first) / 1000;
  return {
    ttft_ms: first - t0,
    tokens_per_s: tokens.length > 1 && decodeS > 0 ? (tokens.length - 1) / decodeS : 0,
    tokens,
  };
}

await once(Math.min(8, spec.maxTokens));
const runs = [];
for (let i = 0; i < spec.runs; i++) runs.push(await once(spec.maxTokens));
process.stdout.write(JSON.stringify({ version: packageVersion(), threads: context.currentThreads, load_s: loadS, runs }));
await context.dispose();
await model.dispose();
await llama.dispose();
