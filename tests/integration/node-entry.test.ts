// The package as a plain Node program uses it: the CLI starts and stops the worker, an ESM script
// (`import { qwen } from "qwenbook"`) attaches to it and exits by itself, and require() and
// import give the same module.
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Qwen } from "../../kernel/src/index";
import { kernelDir, privateRuntimeDir, runCli, tinyModel } from "./helpers";

let runtimeDir: string;
// An app folder outside the repo with qwenbook "installed", as npm would link it.
const app = mkdtempSync(join(tmpdir(), "qwenbook-app-"));

beforeAll(() => {
  runtimeDir = privateRuntimeDir("entry");
  mkdirSync(join(app, "node_modules"));
  symlinkSync(kernelDir, join(app, "node_modules", "qwenbook"), "dir");
});

afterAll(async () => {
  await new Qwen().shutdown();
});

function node(args: string[], file?: { name: string; text: string }) {
  if (file) writeFileSync(join(app, file.name), file.text);
  // The timeout turns a script that never exits into a failure instead of a stuck suite.
  return spawnSync(process.execPath, args, { cwd: app, encoding: "utf8", env: process.env, timeout: 90_000 });
}

describe("qwenbook CLI and Node entry points", () => {
  it("reports usage errors and a missing worker with distinct exit codes", () => {
    const bogus = runCli("frobnicate");
    expect(bogus.status).toBe(2);
    expect(bogus.stderr).toMatch(/unknown command "frobnicate".*usage: qwenbook/s);
    expect(runCli("tiny-model").status).toBe(2);
    const arch = runCli("tiny-model", "out", "--arch", "llama");
    expect(arch.status).toBe(2);
    expect(arch.stderr).toMatch(/--arch must be one of qwen2, qwen3, qwen3-moe, got "llama"/);
    expect(runCli("worker", "start", "--device", "gpu").stderr).toMatch(/--device must be auto, cpu, cuda or cuda:N/);
    const status = runCli("worker", "status");
    expect(status.status).toBe(1);
    expect(status.stdout).toContain(`No worker is running (runtime file ${join(runtimeDir, "qwenbook-worker.json")})`);
  });

  it("starts a worker, and says so when one is already running", () => {
    const start = runCli("worker", "start", "--device", "cpu");
    expect(start.status, start.stderr).toBe(0);
    expect(start.stdout).toMatch(/^Started the worker: pid \d+ at ipc:\/\/\/\S+\/qwenbook-ipc\/qwenbook-worker-router\n/); // a Unix socket by default
    expect(runCli("worker", "start").stdout).toMatch(/already running: pid \d+/);
  });

  it("runs an ESM script that attaches to that worker and exits after its last await", () => {
    const r = node(["chat.mjs"], {
      name: "chat.mjs",
      text: `
        import { qwen, Reply } from "qwenbook";
        const m = await qwen.load(${JSON.stringify(tinyModel())}, { quiet: true });
        const reply = await m.chat("hi").greedy().maxTokens(5).quiet();
        const { pid } = await qwen.status();
        console.log(JSON.stringify({ isReply: reply instanceof Reply, tokens: reply.completionTokens, pid }));
      `,
    });
    expect(r.signal, "the script did not exit by itself").toBeNull();
    expect(r.status, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout.trim()) as { isReply: boolean; tokens: number; pid: number };
    expect(out).toMatchObject({ isReply: true, tokens: 5 });
    expect(runCli("worker", "start").stdout).toContain(`pid ${out.pid}`);
  });

  it("gives the same module to require() and import", () => {
    const r = node(["same.cjs"], {
      name: "same.cjs",
      text: `
        const cjs = require("qwenbook");
        import("qwenbook").then((esm) => {
          const names = (o) => Object.keys(o).filter((k) => k !== "default" && k !== "__esModule").sort().join();
          console.log(JSON.stringify({ same: esm.qwen === cjs.qwen, names: names(esm) === names(cjs), n: names(cjs).split(",").length }));
        });
      `,
    });
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({ same: true, names: true, n: expect.any(Number) });
  });

  it("shows the model in worker status, then stops the worker and its runtime file", () => {
    const status = runCli("worker", "status");
    expect(status.status, status.stderr).toBe(0);
    expect(status.stdout).toMatch(/models:\n {2}tiny-qwen2:\S+ {2}Qwen2ForCausalLM/);
    // The chat above ran on the model's chat engine, whose cache status lists.
    expect(status.stdout).toMatch(/key\/value caches:\n {2}tiny-qwen2:\S+ \(chat\) on cpu: \d+\/\d+ blocks of \d+ tokens, [\d.]+ \w+; 0 running, 0 waiting, prefix hits \d+%/);
    const stop = runCli("worker", "stop");
    expect(stop.status).toBe(0);
    expect(stop.stdout).toMatch(/^Stopped the worker \(pid \d+\)\./);
    expect(existsSync(join(runtimeDir, "qwenbook-worker.json"))).toBe(false);
    expect(runCli("worker", "stop").stdout).toContain("No worker is running.");
  });
});
