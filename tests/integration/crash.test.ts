// A worker killed (SIGKILL) in the middle of a training run that saves checkpoints: the run's promise
// rejects naming the train request and the dead worker, the next call starts a fresh worker, and the
// run resumes from its newest complete checkpoint; a half-written or partly copied checkpoint is never
// the one it resumes from. The worker's on-disk run index outlives it: qwen.runs() lists the run as
// interrupted at its last complete checkpoint, and run.resume() finishes it exactly as an
// uninterrupted run would have.
import { spawnSync } from "node:child_process";
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Qwen, WorkerExitedError, type Model, type TrainResult } from "../../kernel/src/index";
import type { DisplaySink } from "../../kernel/src/display/sink";
import { cli, privateRuntimeDir, tinyModel } from "./helpers";

const ROWS = Array.from({ length: 16 }, (_, i) => ({ instruction: `问题${i}`, output: `回答${i}号` }));
const STEPS = 40;
const RESUME_STEPS = 12;

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
  }, 600_000); // a worker restart and a 40-step run: over a minute on a loaded 2-core machine
});

/** `npx qwenbook worker status`, as a user would run it (exit code and what it printed). */
function workerStatus(): { code: number | null; out: string } {
  const r = spawnSync(process.execPath, [cli, "worker", "status"], { encoding: "utf8", env: process.env });
  return { code: r.status, out: r.stdout + r.stderr };
}

describe("a run whose worker crashed, from the run index", () => {
  let killer: Qwen | undefined;
  let after: Qwen | undefined;
  afterAll(async () => {
    killer?.disconnect();
    await after?.shutdown(); // the worker started after the crash
  });

  it("is listed interrupted at its last complete checkpoint, and resume() finishes it with an uninterrupted run's losses", async () => {
    const run = model.lora({ r: 4, dropout: 0.1 }).dataset(ROWS).maxLength(32).batchSize(2).maxSteps(RESUME_STEPS).logEvery(1).saveEvery(2).seed(5);
    const reference = await run.output(join(tmp, "uninterrupted")).quiet().train();
    expect(reference.step).toBe(RESUME_STEPS);

    const { pid } = await qwen.status();
    const out = join(tmp, "crashed");
    let checkpointSeen = -1;
    // A second client on the same worker, to act on the first checkpoint event as it arrives.
    killer = new Qwen({
      sink,
      onMessage: (m) => {
        if (m.type === "checkpoint" && checkpointSeen < 0) {
          process.kill(pid, "SIGKILL");
          checkpointSeen = Date.now();
        }
      },
    });
    const same = await killer.load(tinyModel(), { dtype: "fp32", device: "cpu", quiet: true });
    const error = await same.lora({ r: 4, dropout: 0.1 }).dataset(ROWS).maxLength(32).batchSize(2).maxSteps(RESUME_STEPS).logEvery(1).saveEvery(2).seed(5)
      .output(out).quiet().train().then(() => null, (e: unknown) => e);
    expect(checkpointSeen).toBeGreaterThan(0);
    expect(error).toBeInstanceOf(WorkerExitedError);
    const newest = steps(out).at(-1)!;
    console.log(`$ kill -9 ${pid}   # at the first checkpoint event; newest complete checkpoint on disk: checkpoint-${newest}`);

    // No worker now: the run index on disk still knows the run.
    after = new Qwen({ sink });
    const [offline] = (await after.runs()).filter((r) => r.outputDir === out);
    console.log(`> (await qwen.runs())  # no worker running\n${String(offline)}`);
    expect(offline.state).toBe("interrupted");
    expect(offline.checkpoint).toBe(join(out, `checkpoint-${newest}`));
    const down = workerStatus();
    console.log(`$ npx qwenbook worker status   # exit ${down.code}\n${down.out}`);
    expect(down.code).toBe(1);
    expect(down.out).toMatch(new RegExp(`${offline.runId.slice(0, 8)}  interrupted  step ${newest}/${RESUME_STEPS} .*checkpoint ${join(out, `checkpoint-${newest}`)}`));

    // A new worker reads the index and lists the run the same way.
    await after.load(tinyModel(), { dtype: "fp32", device: "cpu", quiet: true });
    expect((await after.status()).pid).not.toBe(pid);
    const [listed] = (await after.runs()).filter((r) => r.outputDir === out);
    console.log(`> (await qwen.runs())  # new worker pid ${(await after.status()).pid}\n${String(listed)}`);
    expect(listed.runId).toBe(offline.runId);
    expect(listed.state).toBe("interrupted");
    expect(listed.step).toBe(newest);
    expect(listed.checkpoint).toBe(join(out, `checkpoint-${newest}`));

    const rest = await listed.resume({ quiet: true });
    console.log(`> await run.resume()\n${String(rest).split("\n")[0]}`);
    expect(rest.status).toBe("completed");
    expect(rest.resumedFrom).toBe(join(out, `checkpoint-${newest}`));
    expect(rest.outputDir).toBe(out);
    expect(rest.step).toBe(RESUME_STEPS);
    const last = (r: TrainResult) => r.losses[r.losses.length - 1];
    console.log(`final step ${last(rest).step}: loss ${last(rest).loss} resumed, ${last(reference).loss} uninterrupted`);
    expect(last(rest).step).toBe(RESUME_STEPS);
    expect(last(rest).loss).toBeCloseTo(last(reference).loss, 5);
    // Every step after the checkpoint matches the uninterrupted run, not only the last.
    const after_ = (r: TrainResult) => r.losses.filter((p) => p.step > newest).map((p) => [p.step, p.loss]);
    after_(rest).forEach(([step, loss], i) => {
      expect(step).toBe(after_(reference)[i][0]);
      expect(loss).toBeCloseTo(after_(reference)[i][1], 5);
    });

    const states = Object.fromEntries((await after.runs()).filter((r) => r.outputDir === out).map((r) => [r.runId, r.state]));
    expect(Object.keys(states)).toHaveLength(2);
    expect(states[listed.runId]).toBe("resumed");
    expect(Object.entries(states).filter(([id]) => id !== listed.runId).map(([, state]) => state)).toEqual(["completed"]);
    await expect(listed.resume()).rejects.toThrow(/cannot be resumed/);
    const up = workerStatus();
    console.log(`$ npx qwenbook worker status   # exit ${up.code}\n${up.out}`);
    expect(up.code).toBe(0);
    expect(up.out).toMatch(new RegExp(`${listed.runId.slice(0, 8)}  resumed +step ${newest}/${RESUME_STEPS}`));
    expect(up.out).toMatch(/OpenAI servers: none/);
  }, 600_000); // three training runs and a worker start: minutes on a loaded 2-core machine
});
