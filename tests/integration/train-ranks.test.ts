// Training on several ranks from the notebook API: two CPU processes (torchrun, gloo) of the worker's
// machine train a LoRA adapter whose progress lines carry both ranks' memory, and the worker's own model
// chats with the adapter afterwards.
import { existsSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Qwen, WorkerError, type Model } from "../../kernel/src/index";
import type { DisplaySink } from "../../kernel/src/display/sink";
import { privateRuntimeDir, tinyModel } from "./helpers";

const ROWS = Array.from({ length: 8 }, (_, i) => ({ instruction: `问题${i}`, output: `回答${i}号` }));
const tmp = mkdtempSync(join(tmpdir(), "qwenbook-ranks-"));
let text = "";
const sink: DisplaySink = { rich: false, text: (chunk) => void (text += chunk), display: () => undefined };
let qwen: Qwen;
let model: Model;

beforeAll(async () => {
  privateRuntimeDir("train-ranks");
  qwen = new Qwen({ sink });
  model = await qwen.load(tinyModel(), { dtype: "fp32", device: "cpu", quiet: true });
});

afterAll(async () => {
  await qwen?.shutdown();
});

describe("training on several ranks", () => {
  it("trains on two ranks with the global batch of one device and chats with the result", async () => {
    const result = await model.lora({ r: 4 }).dataset(ROWS).maxLength(32).batchSize(1).gradAccum(2).maxSteps(2).lr(1e-3)
      .devices(2).strategy("ddp").output(join(tmp, "ddp")).train();
    expect(result.status).toBe("completed");
    expect(existsSync(join(tmp, "ddp", "adapter_model.safetensors"))).toBe(true);
    const lines = text.split("\n");
    expect(lines.find((l) => l.includes("steps (") && l.includes("2 rows per step"))).toBeDefined();
    expect(lines.filter((l) => /step \d\/2 .* · memory rank 0 [\d.]+ GiB, rank 1 [\d.]+ GiB$/.test(l))).toHaveLength(2);
    const reply = await model.withAdapter(result).chat("问题1").greedy().maxTokens(4).quiet();
    expect(reply.completionTokens).toBeGreaterThan(0);
  });

  it("refuses a batch that does not split over the ranks before any rank starts", async () => {
    const run = model.lora({ r: 4 }).dataset(ROWS).gradAccum(3).devices(2).output(join(tmp, "bad")).quiet();
    const error = await run.train().catch((e: unknown) => e);
    expect(error).toBeInstanceOf(WorkerError);
    expect(String(error)).toMatch(/gradAccum 3 does not split over 2 ranks.*gradAccum\(4\)/);
    expect(existsSync(join(tmp, "bad"))).toBe(false);
  });
});
