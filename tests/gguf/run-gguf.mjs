// Runs a GGUF file in llama.cpp (through node-llama-cpp) and prints what it computed, as JSON on stdout.
//
// Input (JSON file given as the only argument):
//   { "model": "<path.gguf>", "texts": ["..."],            // tokenized by llama.cpp, for comparison
//     "prompts": [[ids...]], "maxTokens": 16,              // greedy continuation of each id prompt
//     "forced": [[ids...]], "topK": 0 }                    // per-position argmax (teacher forcing), and with
//                                                          // topK > 0 also the top-k probabilities (slow: full vocab)
// Output: { "tokenized": [[ids]], "greedy": [[ids]], "forced": [[{token, top?: [[id, p], ...]} per position]],
//           "bos": id|null }
// Prompts are token ids, so the comparison does not depend on chat templates or BOS handling.
// { "runs": [spec, ...] } runs several such specs in this one process (one start of node and llama.cpp, ~2.5 s of
// CPU each) and prints the array of their outputs.
import { readFileSync } from "node:fs";
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const input = JSON.parse(readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
const outputs = [];
for (const spec of input.runs ?? [input]) outputs.push(await run(spec));
process.stdout.write(JSON.stringify(input.runs ? outputs : outputs[0]));
await llama.dispose();

async function run(spec) {
  const model = await llama.loadModel({ modelPath: spec.model });
  const longest = Math.max(8, ...(spec.prompts ?? []).map((p) => p.length), ...(spec.forced ?? []).map((p) => p.length));
  const context = await model.createContext({ contextSize: Math.max(256, longest + (spec.maxTokens ?? 0) + 8), threads: 1 });

  const out = { tokenized: [], greedy: [], forced: [], bos: model.tokens.bos ?? null };
  // One sequence, emptied before each prompt, so no state carries over from one prompt to the next.
  const seq = context.getSequence();
  for (const text of spec.texts ?? []) {
    out.tokenized.push(Array.from(model.tokenize(text, false)));
  }
  for (const prompt of spec.prompts ?? []) {
    await seq.clearHistory();
    const got = [];
    // Temperature 0 is greedy (argmax); no repeat penalty unless asked for.
    for await (const token of seq.evaluate(prompt, { temperature: 0, yieldEogToken: true })) {
      got.push(token);
      if (got.length >= spec.maxTokens) break;
    }
    out.greedy.push(got);
  }
  for (const ids of spec.forced ?? []) {
    await seq.clearHistory();
    const topK = spec.topK ?? 0;
    const next = topK > 0
      ? { token: true, probabilities: true, options: { temperature: 1, topK: 0, topP: 1, minP: 0 } }
      : { token: true, options: { temperature: 0 } };
    const res = await seq.controlledEvaluate(ids.map((id) => [id, { generateNext: next }]));
    out.forced.push(res.map((r) => {
      if (topK === 0) return { token: r.next.token };
      const top = [];
      for (const [id, p] of r.next.probabilities) { top.push([id, p]); if (top.length >= topK) break; }
      return { token: top[0][0], top };
    }));
  }
  await context.dispose();
  await model.dispose();
  return out;
}
