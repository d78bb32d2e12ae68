// Two notebooks on one worker: each client that loads a model is one of its users, so an unload in one
// notebook leaves the model loaded for the other (and says so), `{ force: true }` frees it for both, and a
// kernel that exits without unloading stops counting.
import { spawn } from "node:child_process";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Qwen } from "../../kernel/src/index";
import { kernelDir, privateRuntimeDir, recordingSink, tinyModel } from "./helpers";

const OPTIONS = { dtype: "fp32", device: "cpu", quiet: true } as const;
let first: Qwen;
let second: Qwen;
let firstSink: ReturnType<typeof recordingSink>;
let secondSink: ReturnType<typeof recordingSink>;

const loadedIds = async () => (await first.status()).models.map((m) => m.id);

beforeAll(() => {
  privateRuntimeDir("shared");
  firstSink = recordingSink();
  secondSink = recordingSink();
  first = new Qwen({ sink: firstSink });
  second = new Qwen({ sink: secondSink });
});

afterAll(async () => {
  second?.disconnect();
  await first?.shutdown();
});

describe("a model loaded by two notebooks", () => {
  it("stays loaded for the other one when one unloads it, and is freed by the last", async () => {
    const a = await first.load(tinyModel(), OPTIONS);
    const b = await second.load(tinyModel(), OPTIONS);
    expect(b.id).toBe(a.id);
    expect(await b.unload()).toBeUndefined();
    expect(secondSink.out.join("")).toBe(
      `${a.id} is still used by 1 other notebook; unloaded from this one (the memory is freed when the last one unloads it, or with m.unload({ force: true }))\n`,
    );
    expect(await loadedIds()).toEqual([a.id]);
    expect((await a.chat("hi").greedy().maxTokens(2).quiet()).completionTokens).toBeGreaterThan(0);
    // The notebook that unloaded it cannot use its handle any more, though the weights stay for the other.
    await expect(b.chat("hi").maxTokens(2).quiet()).rejects.toThrow(`${b.id} was unloaded in this notebook (m.unload()); load it again with qwen.load(`);

    firstSink.out.length = 0;
    expect(await a.unload()).toBeUndefined();
    expect(firstSink.out).toEqual([]); // freed: nothing to say, and no value to print
    expect(await loadedIds()).toEqual([]);
  });

  it("is freed for both with force, saying so", async () => {
    const a = await first.load(tinyModel(), OPTIONS);
    const b = await second.load(tinyModel(), OPTIONS);
    secondSink.out.length = 0;
    await b.unload({ force: true });
    expect(secondSink.out.join("")).toBe(`${a.id} unloaded (force), also for the 1 other notebook using it\n`);
    expect(await loadedIds()).toEqual([]);
    await expect(b.unload({ forse: true } as never)).rejects.toThrow(/unload\(options\) has no option "forse"/);
  });

  it("keeps counting a notebook that reconnected (same session), and stops counting a kernel that exited", async () => {
    const a = await first.load(tinyModel(), OPTIONS);
    const b = await second.load(tinyModel(), OPTIONS);
    first.disconnect(); // the next call reconnects with the same session
    secondSink.out.length = 0;
    await b.unload();
    expect(secondSink.out.join("")).toMatch(/is still used by 1 other notebook/);
    await a.unload();
    expect(await loadedIds()).toEqual([]);

    // Another kernel process loads the model and is killed without unloading it.
    const script = `
      const { qwen } = require(${JSON.stringify(join(kernelDir, "dist", "index.js"))});
      qwen.load(${JSON.stringify(tinyModel())}, ${JSON.stringify(OPTIONS)}).then((m) => console.log("loaded " + m.id), (e) => { console.error(e); process.exit(1); });
      process.stdin.resume();
    `;
    const child = spawn(process.execPath, ["-e", script], { env: process.env, stdio: ["pipe", "pipe", "pipe"] });
    let err = "";
    child.stderr.on("data", (d: Buffer) => (err += d));
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    const line = await new Promise<string>((resolve, reject) => {
      let out = "";
      child.stdout.on("data", (d: Buffer) => {
        out += d;
        if (out.includes("\n")) resolve(out.trim());
      });
      child.once("exit", (code) => reject(new Error(`the other kernel exited (${code}) before loading: ${err}`)));
    });
    const mine = await second.load(tinyModel(), OPTIONS);
    expect(line).toBe(`loaded ${mine.id}`);
    child.kill("SIGKILL");
    await exited;
    secondSink.out.length = 0;
    await mine.unload();
    expect(secondSink.out).toEqual([]);
    expect(await loadedIds()).toEqual([]);
  });
});
