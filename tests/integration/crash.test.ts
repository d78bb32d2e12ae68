// A worker killed (SIGKILL) in the middle of a training run that saves checkpoints: the run's promise
// rejects naming the train request and the dead worker, the next call starts a fresh worker, and the
// run resumes from its newest complete checkpoint; a half-written or partly copied checkpoint is never
// the one it resumes from.
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Qwen, WorkerExitedError, type Model } from "../../kernel/src/index";
import type { DisplaySink } from "../../kernel/src/display/sink";
import { privateRuntimeDir, tinyModel } from "./helpers";

const ROWS = Array.from({ length: 16 }, (_, i) => ({ instruction: `问题${i}`, output: `回答${i}号` }));
const STEPS = 40;

const tmp = mkdtempSync(join(tmpdir(), "qwenbook-crash-"));
let qwen: Qwen;
let model: Model;
let onLine: ((line: string) => void) | null = null;
const sink: DisplaySink = {
  rich: false,
  text: (chunk) => chunk.split("\n").forEach((line) => onLine?.(line)),
  display: () => undefined,
};

beforeAll(async () => {
  privateRuntimeDir("crash");
  qwen = new Qwen({ sink });
  model = await qwen.load(tinyModel(), { dtype: "fp32", device: "cpu", quiet: true });
});

afterAll(async () => {
  await qwen?.shutdown();
});

const steps = (folder: string): number[] =>
  readdirSync(folder)
    .map((name) => /^checkpoint-(\d+)$/.exec(name))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => Number(m[1]))
    .sort((a, b) => a - b);

describe("worker killed mid-training", () => {
  it("reports the dead train request, restarts on the next call and resumes from the last complete checkpoint", async () => {
    const { pid, log } = await qwen.status();
    const out = join(tmp, "run");
    const run = model.lora({ r: 4 }).dataset(ROWS).maxLength(32).batchSize(2).maxSteps(STEPS).logEvery(1).saveEvery(2).seed(5);
    let killedAt = 0;
    onLine = (line) => {
      if (killedAt === 0 && /^\[train\] step +7\//.test(line)) {
        process.kill(pid, "SIGKILL");
        killedAt = Date.now();
      }
    };
    const error = await run.output(out).train().then(
      () => null,
      (e: unknown) => e,
    );
    const reportedAfterMs = Date.now() - killedAt;
    onLine = null;
    expect(killedAt).toBeGreaterThan(0);
    expect(error).toBeInstanceOf(WorkerExitedError);
    const message = (error as Error).message;
    expect(message).toMatch(new RegExp(`^The qwenbook worker \\(pid ${pid}\\) exited while this train request \\([0-9a-f-]{36}\\) was waiting for it`));
    expect(message).toContain(log);
    console.log(`train request reported dead ${reportedAfterMs} ms after SIGKILL`);

    const saved = steps(out);
    expect(saved.length).toBeGreaterThan(0);
    const newest = saved[saved.length - 1];
    // What an interrupted save leaves (a hidden temp folder, even one holding every file) and a
    // checkpoint folder copied only in part must both be passed over.
    const half = join(out, ".tmp-checkpoint-9999-x1y2z3");
    cpSync(join(out, `checkpoint-${newest}`), half, { recursive: true });
    const partial = join(out, "checkpoint-9998");
    mkdirSync(partial);
    cpSync(join(out, `checkpoint-${newest}`, "trainer_state.json"), join(partial, "trainer_state.json"));
    writeFileSync(join(partial, "adapter_model.safetensors"), "");

    const rest = await run.resume(out).quiet().train();
    expect((await qwen.status()).pid).not.toBe(pid);
    expect(rest.status).toBe("completed");
    expect(rest.resumedFrom).toBe(join(out, `checkpoint-${newest}`));
    expect(rest.step).toBe(STEPS);
    expect(existsSync(half)).toBe(false); // the run cleared the leftover
    rmSync(partial, { recursive: true });
    expect(steps(out)).toContain(STEPS);
  });
});
