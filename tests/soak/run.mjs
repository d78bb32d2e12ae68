#!/usr/bin/env node
// Soak: a worker on localhost under a long mixed load through the notebook API. Short generations
// from several concurrent callers (some cancelled at random), a training run on another model, and
// a kernel restart half-way (the old client goes, a new one re-attaches to the models and the run).
// Checks that every request got exactly one reply and that the worker's memory levels off.
//   npm run soak [-- --seconds 180 --callers 4]
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const repo = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const { values: args } = parseArgs({
  options: { seconds: { type: "string", default: "180" }, callers: { type: "string", default: "4" }, seed: { type: "string", default: "1" } },
});
const seconds = Number(args.seconds);
const callers = Number(args.callers);
if (!(seconds >= 10) || !(callers >= 1)) throw new Error("--seconds must be at least 10 and --callers at least 1");

const scratch = mkdtempSync(join(tmpdir(), "qwenbook-soak-"));
process.env.QWENBOOK_RUNTIME_DIR = join(scratch, "runtime"); // a worker of its own, never the user's
process.env.HF_HUB_OFFLINE = "1";
process.env.OMP_NUM_THREADS ??= "1";
process.env.QWENBOOK_PYTHON ??= join(repo, ".venv", "bin", "python");
// The tiny model `npm run soak`'s setup step keeps in .qwenbook/models (as `npm run bench` uses it); a throwaway one
// only where that is missing (the script run on its own): writing one costs ~8 s of CPU for nothing.
const setupModel = join(repo, ".qwenbook", "models", "tiny-qwen2");
let model = process.env.QWENBOOK_TINY_MODEL ?? (existsSync(join(setupModel, "config.json")) ? setupModel : undefined);
if (!model) {
  model = join(scratch, "tiny-qwen2");
  execFileSync(process.execPath, [join(repo, "kernel", "dist", "cli", "main.js"), "tiny-model", model], { stdio: "inherit" });
}

const { Qwen } = await import("qwenbook");

// A small deterministic generator, so that a failing soak can be run again the same way.
let state = Number(args.seed) >>> 0 || 1;
const random = () => ((state = (Math.imul(state, 1664525) + 1013904223) >>> 0) / 2 ** 32);
const pick = (items) => items[Math.floor(random() * items.length)];
const PROMPTS = ["你好", "Hi!", "What is 2+2?", "讲个笑话", "Name a colour.", "Say something short."];
const quiet = { rich: false, text: () => undefined, display: () => undefined };

const counts = { sent: 0, completed: 0, cancelled: 0, failed: 0 };
const failures = new Map();
const replies = new Map(); // parent msg_id -> replies seen, across every client
const repliesByType = new Map();
const tap = (m) => {
  if (!m.type.endsWith("_reply") || m.parentMsgId === undefined) return;
  replies.set(m.parentMsgId, (replies.get(m.parentMsgId) ?? 0) + 1);
  repliesByType.set(m.type, (repliesByType.get(m.type) ?? 0) + 1);
};

function rssMiB(pid) {
  const line = readFileSync(`/proc/${pid}/status`, "utf8").split("\n").find((l) => l.startsWith("VmRSS:"));
  return Math.round(Number(line.split(/\s+/)[1]) / 1024);
}

/** One generation as a notebook cell makes it; about one in eight is cancelled part-way. */
async function oneGeneration(chatModel) {
  counts.sent++;
  const request = chatModel.chat(pick(PROMPTS)).maxTokens(1 + Math.floor(random() * 6)).temperature(0.7).seed(counts.sent);
  try {
    if (random() < 0.125) {
      const stream = request.stream();
      for await (const _ of stream) break; // leaving the loop cancels the request
      const reply = await stream.reply;
      counts[reply.finishReason === "cancelled" ? "cancelled" : "completed"]++;
    } else {
      await request.quiet();
      counts.completed++;
    }
  } catch (e) {
    counts.failed++;
    const key = `${e.name}: ${String(e.message).split("\n")[0]}`;
    failures.set(key, (failures.get(key) ?? 0) + 1);
  }
}

/** `callers` loops of generations until `until` (ms since epoch); resolves when all have stopped. */
function generate(chatModel, until) {
  return Promise.all(
    Array.from({ length: callers }, async () => {
      while (Date.now() < until) await oneGeneration(chatModel);
    }),
  );
}

const rows = Array.from({ length: 32 }, (_, i) => ({ instruction: `问题${i}`, output: `回答${i}号` }));
const memory = [];

// ---- first kernel: load both models, start the run, chat until half-time
const first = new Qwen({ sink: quiet, onMessage: tap });
const chatA = await first.load(model, { dtype: "fp32", device: "cpu", quiet: true });
const trainB = await first.load(model, { dtype: "bf16", device: "cpu", quiet: true });
const pid = (await first.status()).pid;
await generate(chatA, Date.now() + 5000); // warm-up, so the first sample is the working size
const started = Date.now();
const half = started + (seconds * 1000) / 2;
const end = started + seconds * 1000;
memory.push({ at: "start", rssMiB: rssMiB(pid), requests: counts.sent });
const training = trainB
  .lora({ r: 8 })
  .dataset(rows)
  .maxLength(48)
  .batchSize(2)
  .maxSteps(1_000_000)
  .saveEvery(200)
  .output(join(scratch, "run"))
  .quiet()
  .train();
const trainingLost = training.then(
  () => "the run ended before the restart",
  (e) => e.message,
);
await generate(chatA, half);
// The restart must find the run going: wait (still chatting) until the worker lists it.
while (Date.now() < end && !(await first.runs()).some((r) => r.state === "running" && r.step > 0)) await oneGeneration(chatA);
memory.push({ at: "middle", rssMiB: rssMiB(pid), requests: counts.sent });

// ---- kernel restart: the old client goes away mid-run; a new one finds the models and the run
first.disconnect();
const lostReason = await trainingLost;
const second = new Qwen({ sink: quiet, onMessage: tap });
const reattached = await second.load(model, { dtype: "fp32", device: "cpu", quiet: true });
const runs = await second.runs();
const run = runs.find((r) => r.state === "running");
if (!run) {
  await second.shutdown();
  throw new Error(`after the restart the worker lists no running training run (${runs.map(String).join(", ") || "none"}); the first client saw: ${lostReason}`);
}
const watching = run.watch({ quiet: true });
const stepAtRestart = run.step;
await generate(reattached, end);
await run.cancel();
const ended = await watching;
memory.push({ at: "end", rssMiB: rssMiB(pid), requests: counts.sent });
const status = await second.status();
await second.shutdown();
rmSync(scratch, { recursive: true, force: true });

// ---- report
const generateReplies = repliesByType.get("generate_reply") ?? 0;
const duplicated = [...replies.values()].filter((n) => n > 1).length;
const settled = counts.completed + counts.cancelled + counts.failed;
const growth = (memory[2].rssMiB - memory[1].rssMiB) / memory[1].rssMiB;
const problems = [];
if (settled !== counts.sent) problems.push(`${counts.sent - settled} generations never settled`);
if (generateReplies !== counts.sent) problems.push(`${counts.sent} generations sent but ${generateReplies} generate replies arrived`);
if (duplicated > 0) problems.push(`${duplicated} requests got more than one reply`);
if (counts.failed > 0) problems.push(`${counts.failed} generations failed`);
if (status.pid !== pid) problems.push(`the worker was replaced (pid ${pid} -> ${status.pid})`);
if (reattached.id !== chatA.id) problems.push("the new client loaded the model again instead of re-attaching");
if (ended.state !== "cancelled" || ended.step <= stepAtRestart) problems.push(`the run ended ${ended.state} at step ${ended.step} (step ${stepAtRestart} at the restart)`);
if (growth > 0.2) problems.push(`worker RSS grew ${(growth * 100).toFixed(0)}% in the second half`);

const report = {
  model,
  seconds: Math.round((Date.now() - started) / 1000),
  callers,
  generations: { ...counts, perSecond: Number((counts.sent / seconds).toFixed(1)) },
  replies: { generate: generateReplies, duplicated },
  failures: Object.fromEntries(failures),
  training: { runId: run.runId, stepAtRestart, finalStep: ended.step, state: ended.state, firstClientSaw: lostReason },
  workerRss: memory,
  problems,
};
console.log(JSON.stringify(report, null, 2));
console.log(problems.length === 0 ? "soak: ok" : `soak: FAILED (${problems.join("; ")})`);
process.exit(problems.length === 0 ? 0 : 1);
