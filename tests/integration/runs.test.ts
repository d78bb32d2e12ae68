// A kernel restart during training: the run goes on in the worker, a new client lists it with
// qwen.runs(), and run.watch() replays its history and follows it live to the end, every step once.
// Stopping a watch leaves the run running.
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Qwen, type Model } from "../../kernel/src/index";
import type { DisplaySink } from "../../kernel/src/display/sink";
import { privateRuntimeDir, tinyModel } from "./helpers";

const ROWS = Array.from({ length: 16 }, (_, i) => ({ instruction: `问题${i}`, output: `回答${i}号` }));
const STEPS = 300;

/** A terminal-like sink that keeps the step numbers of the progress lines it printed. */
function stepSink(): DisplaySink & { steps: number[]; lines: string[]; onStep?: (step: number) => void } {
  const sink: DisplaySink & { steps: number[]; lines: string[]; onStep?: (step: number) => void } = {
    rich: false,
    steps: [],
    lines: [],
    text(chunk) {
      for (const line of chunk.split("\n").filter(Boolean)) {
        sink.lines.push(line);
        const m = /^\[train\] step +(\d+)\//.exec(line);
        if (m) {
          sink.steps.push(Number(m[1]));
          sink.onStep?.(Number(m[1]));
        }
      }
    },
    display: () => undefined,
  };
  return sink;
}

const tmp = mkdtempSync(join(tmpdir(), "qwenbook-runs-"));
let before: Qwen;
let after: Qwen | undefined;
let model: Model;
const beforeSink = stepSink();

beforeAll(async () => {
  privateRuntimeDir("runs");
  before = new Qwen({ sink: beforeSink });
  model = await before.load(tinyModel(), { dtype: "fp32", device: "cpu", quiet: true });
});

afterAll(async () => {
  await (after ?? before)?.shutdown();
});

describe("re-attaching to a training run after a kernel restart", () => {
  it("lists the run, replays its history and follows it live; a stopped watch leaves the run going", async () => {
    const out = join(tmp, "run");
    const fifth = new Promise<void>((resolve) => (beforeSink.onStep = (s) => s >= 5 && resolve()));
    const training = model.lora({ r: 4 }).dataset(ROWS).maxLength(32).batchSize(2).maxSteps(STEPS).logEvery(1).output(out).train();
    const lost = training.then(
      () => "finished",
      (e: unknown) => (e as Error).message,
    );
    await fifth;
    before.disconnect(); // the kernel restarts: its client goes away, the worker and the run stay
    expect(await lost).toMatch(/qwen\.disconnect\(\) was called/);

    after = new Qwen({ sink: stepSink() });
    const runs = await after.runs();
    expect(runs).toHaveLength(1);
    const [listed] = runs;
    expect(listed.state).toBe("running");
    expect(listed.outputDir).toBe(out);
    expect(listed.totalSteps).toBe(STEPS);
    expect(listed.step).toBeGreaterThanOrEqual(5);
    expect(String(listed)).toMatch(/^TrainingRun\([0-9a-f]{8}, running, step \d+\/300, /);

    // A watch stopped early replays what was done so far and ends; the run does not.
    const first = stepSink();
    const stop = new AbortController();
    const firstWatch = new Qwen({ sink: first });
    first.onStep = () => stop.abort();
    const stopped = await (await firstWatch.runs())[0].watch({ signal: stop.signal });
    firstWatch.disconnect();
    expect(stopped.state).toBe("running");
    expect(first.steps[0]).toBe(1);

    const watcher = stepSink();
    const full = new Qwen({ sink: watcher });
    const ended = await (await full.runs())[0].watch();
    full.disconnect();
    expect(ended.state).toBe("completed");
    expect(ended.step).toBe(STEPS);
    // History and live events join without a gap or a repeat.
    expect(watcher.steps).toEqual(Array.from({ length: STEPS }, (_, i) => i + 1));
    expect(watcher.lines[watcher.lines.length - 1]).toMatch(/^\[train\] done: 300 steps in /);

    const [done] = await after.runs();
    expect(done.state).toBe("completed");
    expect(done.runId).toBe(listed.runId);
    await expect(done.watch({ quiet: true })).resolves.toMatchObject({ state: "completed", step: STEPS });
    expect(await done.cancel()).toBe(false);
  }, 600_000); // 300 training steps, watched twice: minutes on a loaded 2-core machine

  it("cancels a run another client started, into a checkpoint", async () => {
    const starter = new Qwen({ sink: stepSink() });
    const own = await starter.load(tinyModel(), { dtype: "fp32", device: "cpu", quiet: true });
    const started = stepSink();
    const first = new Promise<void>((resolve) => (started.onStep = () => resolve()));
    const starterWithSink = new Qwen({ sink: started });
    const same = await starterWithSink.load(tinyModel(), { dtype: "fp32", device: "cpu", quiet: true });
    expect(same.id).toBe(own.id);
    const training = same.lora({ r: 4 }).dataset(ROWS).maxLength(32).batchSize(2).maxSteps(100_000).output(join(tmp, "long")).train();
    await first;
    const running = (await after!.runs()).find((r) => r.state === "running")!;
    expect(await running.cancel()).toBe(true);
    const result = await training;
    expect(result.status).toBe("cancelled");
    expect((await after!.runs()).find((r) => r.runId === running.runId)?.state).toBe("cancelled");
    starter.disconnect();
    starterWithSink.disconnect();
  }, 300_000); // a second model load before the run starts
});
