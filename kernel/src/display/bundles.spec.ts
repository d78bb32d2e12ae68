import Ajv2020 from "ajv/dist/2020";
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import {
  bundlesOutputPath,
  bundlesSchemaPath,
  generateBundles,
  generateBundlesFromFile,
  resolvedBundlesSchema,
  schemaPath,
} from "../../scripts/gen-protocol.mjs";
import {
  CHAT_MIME,
  GPU_MIME,
  GpuHistory,
  TRAIN_MIME,
  TrainRecorder,
  chatBundle,
  gpuBundle,
  type BundleMime,
} from "./bundles";
import type { DisplayBundle } from "./sink";

// The schema as the extension validates with it: protocol.json's DeviceMemory copied in for the gauge.
const schema = resolvedBundlesSchema();
const ajv = new Ajv2020({ allErrors: true, strict: false });
ajv.addSchema(schema);

/** Asserts `data[mime]` matches the shared schema, the contract with the extension. */
function expectValid(mime: BundleMime, data: unknown): void {
  const validate = ajv.getSchema(`${schema.$id}#/$defs/${schema["x-mime-types"][mime]}`)!;
  const ok = validate(data);
  expect(ok ? [] : validate.errors).toEqual([]);
}

/** What Jupyter writes for one display_data output inside a saved notebook (nbformat uses indent 1). */
function savedOutputBytes(bundle: DisplayBundle): number {
  const output = { output_type: "display_data", data: bundle.data, metadata: bundle.metadata ?? {} };
  const nb = { cells: [{ cell_type: "code", outputs: [output] }] };
  return Buffer.byteLength(JSON.stringify(nb, null, 1)) - Buffer.byteLength(JSON.stringify({ cells: [{ cell_type: "code", outputs: [] }] }, null, 1));
}

function recordRun(steps: number, options: { maxPoints?: number; evalEvery?: number } = {}): TrainRecorder {
  const rec = new TrainRecorder({
    title: "LoRA r=8 · tiny-qwen2",
    totalSteps: steps,
    totalEpochs: 3,
    config: { r: 8, alpha: 32, lr: 1e-4, batchSize: 4, schedule: "cosine", dataset: "data/huanhuan.json" },
    maxPoints: options.maxPoints,
  });
  for (let s = 1; s <= steps; s++) {
    const progress = s / steps;
    rec.step({
      step: s,
      loss: 2.5 * Math.exp(-3 * progress) + 0.3 + 0.05 * Math.sin(s * 1.7),
      lr: 1e-4 * 0.5 * (1 + Math.cos(Math.PI * progress)),
      epoch: 3 * progress,
      tokensPerSecond: 5819.123,
      elapsedS: s * 0.72,
      etaS: (steps - s) * 0.72,
    });
    if (options.evalEvery && s % options.evalEvery === 0) rec.evaluate(s, 2.4 * Math.exp(-3 * progress) + 0.4);
  }
  return rec;
}

describe("chatBundle", () => {
  const view = {
    model: "Qwen/Qwen2.5-7B-Instruct",
    state: "done" as const,
    messages: [
      { role: "system" as const, content: "You are Qwen." },
      { role: "user" as const, content: "你好 <script>alert(1)</script>" },
      { role: "assistant" as const, content: "你好！我是通义千问。" },
    ],
    stats: { completionTokens: 16, promptTokens: 20, ttftMs: 120.4, durationMs: 400, tokensPerSecond: 45.24, finishReason: "stop" as const },
  };

  it("carries the custom type, text/plain and text/html, and fits the schema", () => {
    const b = chatBundle(view);
    expect(Object.keys(b.data).sort()).toEqual([CHAT_MIME, "text/html", "text/plain"].sort());
    expect(b.data[CHAT_MIME].version).toBe(1);
    expectValid(CHAT_MIME, b.data[CHAT_MIME]);
    const asSinkInput: DisplayBundle = b; // builders feed the kernel's display sink directly
    expect(asSinkInput.data).toBe(b.data);
  });

  it("writes a readable plain-text transcript with the stats", () => {
    const text = chatBundle(view).data["text/plain"];
    expect(text).toBe(
      [
        "system: You are Qwen.",
        "user: 你好 <script>alert(1)</script>",
        "assistant: 你好！我是通义千问。",
        "(16 tokens · 45.2 tokens/s · first token 120 ms)",
      ].join("\n"),
    );
  });

  it("escapes message text in the HTML fallback", () => {
    const html = chatBundle(view).data["text/html"];
    expect(html).not.toContain("<script>");
    expect(html).toContain("&#60;script&#62;alert(1)&#60;/script&#62;");
    expect(html).toContain("你好！我是通义千问。");
  });

  it("says when it is still generating or was cancelled", () => {
    const live = chatBundle({ ...view, state: "generating", stats: { completionTokens: 3 } }).data["text/plain"];
    expect(live.split("\n").pop()).toBe("(generating… · 3 tokens)");
    const cancelled = chatBundle({ ...view, state: "cancelled", stats: { completionTokens: 1 } }).data["text/plain"];
    expect(cancelled.split("\n").pop()).toBe("(cancelled · 1 token)");
  });

  it("includes the error in an error state", () => {
    const b = chatBundle({ ...view, state: "error", error: { name: "WorkerExitedError", message: "worker died" } });
    expectValid(CHAT_MIME, b.data[CHAT_MIME]);
    expect(b.data["text/plain"]).toContain("WorkerExitedError: worker died");
  });
});

describe("TrainRecorder", () => {
  it("keeps one entry per logged step in parallel arrays", () => {
    const view = recordRun(50, { evalEvery: 10 }).view();
    expect(view.train.step).toEqual(Array.from({ length: 50 }, (_, i) => i + 1));
    expect(view.train.loss).toHaveLength(50);
    expect(view.train.lr).toHaveLength(50);
    expect(view.eval).toEqual({ step: [10, 20, 30, 40, 50], loss: expect.any(Array) });
    expect(view.progress).toEqual({ step: 50, totalSteps: 50, totalEpochs: 3, epoch: 3, tokensPerSecond: 5819.1, elapsedS: 36, etaS: 0 });
  });

  it("rounds values so saved notebooks stay small", () => {
    const view = new TrainRecorder({ totalSteps: 10 }).step({ step: 1, loss: 2.123456789, lr: 0.000123456 }).view();
    expect(view.train.loss).toEqual([2.1235]);
    expect(view.train.lr).toEqual([0.000123]);
  });

  it("turns a non-finite loss into a gap, since JSON has no NaN", () => {
    const rec = new TrainRecorder({ totalSteps: 3 });
    rec.step({ step: 1, loss: 1 }).step({ step: 2, loss: Number.NaN }).step({ step: 3, loss: Number.POSITIVE_INFINITY });
    const b = rec.bundle();
    expect(b.data[TRAIN_MIME].train.loss).toEqual([1, null, null]);
    expect(JSON.parse(JSON.stringify(b.data[TRAIN_MIME]))).toEqual(b.data[TRAIN_MIME]);
    expectValid(TRAIN_MIME, b.data[TRAIN_MIME]);
  });

  it("writes a learning rate that reached zero as 0 in the plain text", () => {
    const text = new TrainRecorder({ totalSteps: 1 }).step({ step: 1, loss: 1, lr: 0 }).finish("done").bundle().data["text/plain"];
    expect(text).toBe("Training (done): step 1/1 · loss 1.000 · lr 0");
  });

  it("omits lr when the run never logs one", () => {
    const view = new TrainRecorder({ totalSteps: 2 }).step({ step: 1, loss: 1 }).view();
    expect(view.train).toEqual({ step: [1], loss: [1] });
  });

  it("keeps a preference run's metrics beside the loss, thinned with it, and names margin and accuracy in the text", () => {
    const rec = new TrainRecorder({ totalSteps: 8, maxPoints: 4 });
    rec.step({ step: 1, loss: 0.69 }); // a metric first seen later has a gap before it
    for (let s = 2; s <= 8; s++) rec.step({ step: s, loss: 0.7 - s / 20, metrics: { "rewards/margins": s / 10, "rewards/accuracies": s >= 4 ? 1 : 0.5 } });
    const b = rec.finish("done").bundle();
    const train = b.data[TRAIN_MIME].train;
    expect(train.metrics!["rewards/margins"]).toHaveLength(train.step.length);
    expect(train.step.at(-1)).toBe(8);
    expect(train.metrics!["rewards/margins"]!.at(-1)).toBe(0.8);
    expect(train.metrics!["rewards/margins"]![0]).toBeNull();
    expectValid(TRAIN_MIME, b.data[TRAIN_MIME]);
    expect(b.data["text/plain"]).toContain("reward margin 0.8000 · preference accuracy 100%");
  });

  it("thins long runs to at most maxPoints, evenly, always showing the newest step", () => {
    const view = recordRun(10_000, { maxPoints: 1000 }).view();
    const steps = view.train.step;
    expect(steps.length).toBeLessThanOrEqual(1001);
    expect(steps.length).toBeGreaterThan(500);
    expect(steps[0]).toBe(1);
    expect(steps[steps.length - 1]).toBe(10_000);
    const gaps = new Set(steps.slice(1, -1).map((s, i) => s - steps[i]));
    expect([...gaps]).toEqual([16]);
    expect(view.train.loss).toHaveLength(steps.length);
    expect(view.train.lr).toHaveLength(steps.length);
  });

  it("ends as done, cancelled with its checkpoint, or failed with the error", () => {
    const done = recordRun(5).checkpoint("runs/a/checkpoint-5").finish("done").bundle();
    expectValid(TRAIN_MIME, done.data[TRAIN_MIME]);
    expect(done.data[TRAIN_MIME].state).toBe("done");
    expect(done.data[TRAIN_MIME].progress.etaS).toBeUndefined();
    expect(done.data["text/plain"]).toMatch(/^LoRA r=8 · tiny-qwen2 \(done\): step 5\/5 · epoch 3\.00\/3 · loss /);

    const cancelled = recordRun(5).checkpoint("runs/a/checkpoint-4").finish("cancelled").bundle();
    expect(cancelled.data[TRAIN_MIME].checkpoint).toBe("runs/a/checkpoint-4");
    expect(cancelled.data["text/plain"]).toContain("Last checkpoint: runs/a/checkpoint-4");

    const failed = recordRun(5)
      .finish("failed", { name: "OutOfMemoryError", message: "CUDA out of memory", hint: "Try a smaller batchSize." })
      .bundle();
    expectValid(TRAIN_MIME, failed.data[TRAIN_MIME]);
    expect(failed.data["text/plain"]).toContain("OutOfMemoryError: CUDA out of memory\nTry a smaller batchSize.");
  });

  it("draws the loss as an inline SVG in the HTML fallback", () => {
    const html = recordRun(300).bundle().data["text/html"];
    expect(html).toMatch(/<svg [^>]*aria-label="loss curve"><polyline [^>]*points="[^"]+"\/><\/svg>/);
    const points = html.match(/points="([^"]+)"/)![1].split(" ");
    expect(points.length).toBeLessThanOrEqual(121);
  });

  it("keeps a saved 1,000-step dashboard output under 64 KB", () => {
    const bundle = recordRun(1000, { evalEvery: 50 }).checkpoint("runs/huanhuan/checkpoint-1000").finish("done").bundle();
    expectValid(TRAIN_MIME, bundle.data[TRAIN_MIME]);
    const bytes = savedOutputBytes(bundle);
    expect(bytes).toBeLessThan(64 * 1024);
  });
});

describe("GpuHistory", () => {
  const GiB = 1024 ** 3;
  const sample = (used: number) => ({
    devices: [{ device: "cuda:0", kind: "cuda" as const, name: "NVIDIA H100 80GB HBM3", used, reserved: used + GiB, peak: used + 2 * GiB, total: 80 * GiB }],
    time: 1_700_000_000,
  });

  it("keeps the last N samples per device as the sparkline history", () => {
    const h = new GpuHistory({ samples: 3 });
    for (const used of [1, 2, 3, 4, 5]) h.push(sample(used * GiB));
    const view = h.view(true);
    expect(view.devices[0].history).toEqual([3 * GiB, 4 * GiB, 5 * GiB]);
    expect(view.devices[0].used).toBe(5 * GiB);
    expect(view.live).toBe(true);
    expectValid(GPU_MIME, h.bundle(true).data[GPU_MIME]);
  });

  it("writes one plain-text line per device and says when it is process RAM", () => {
    const h = new GpuHistory();
    h.push(sample(32 * GiB));
    expect(h.bundle(false).data["text/plain"]).toBe(
      "cuda:0 NVIDIA H100 80GB HBM3: 32.0 GiB used / 33.0 GiB reserved / peak 34.0 GiB / 80.0 GiB total (40%)",
    );
    const cpu = gpuBundle({ devices: [{ device: "cpu", kind: "cpu", used: 512 * 1024 ** 2, total: 24 * GiB }] });
    expect(cpu.data["text/plain"]).toBe("cpu process RAM 512 MiB of 24.0 GiB machine RAM (2%) (no GPU in use)");
    expectValid(GPU_MIME, cpu.data[GPU_MIME]);
  });

  it("lists each paged engine's cache under the device it lives on, in text and html, and validates", () => {
    const MiB = 1024 ** 2;
    const chat = {
      model_id: "tiny-qwen2", role: "chat" as const, device: "cuda:0", blocks_total: 4096, blocks_used: 12, block_size: 16,
      cache_bytes: 48 * MiB, prefix_hit_rate: 0.35, running: 1, waiting: 0,
    };
    const server = { ...chat, role: "server" as const, device: "cuda:1", blocks_used: 0, cache_bytes: 3 * GiB, memory_utilization: 0.9, waiting: 2 };
    const h = new GpuHistory();
    h.push({ ...sample(32 * GiB), engines: [chat, server] });
    const bundle = h.bundle(true).data;
    expect(bundle[GPU_MIME].engines).toEqual([chat, server]);
    expectValid(GPU_MIME, bundle[GPU_MIME]);
    expect(bundle["text/plain"]).toBe(
      [
        "cuda:0 NVIDIA H100 80GB HBM3: 32.0 GiB used / 33.0 GiB reserved / peak 34.0 GiB / 80.0 GiB total (40%)",
        "  KV cache (chat, tiny-qwen2): 12 / 4,096 blocks · 48 MiB · prefix hits 35%",
        // cuda:1 is not in the sample: its cache still shows, saying where it is.
        "  KV cache (server, tiny-qwen2) on cuda:1: 0 / 4,096 blocks · 3.0 GiB · prefix hits 35% · 2 waiting",
      ].join("\n"),
    );
    expect(bundle["text/html"]).toContain(
      '<div style="padding-left:1.5em;opacity:.8">KV cache (chat, tiny-qwen2): 12 / 4,096 blocks · 48 MiB · prefix hits 35%</div>',
    );
    // A sample without engines (none running, or a worker that did not say) drops them.
    h.push(sample(GiB));
    expect(h.view(false)).not.toHaveProperty("engines");
    expect(h.bundle(false).data["text/plain"]).not.toContain("KV cache");
    const validate = ajv.getSchema(`${schema.$id}#/$defs/GpuBundle`)!;
    expect(validate({ version: 1, devices: [], engines: [{ ...chat, role: "trainer" }] })).toBe(false);
  });

  it("drops the history of a device that disappears", () => {
    const h = new GpuHistory();
    h.push(sample(GiB));
    h.push({ devices: [{ device: "cpu", kind: "cpu", used: GiB, total: 8 * GiB }], time: 1 });
    expect(h.view(false).devices.map((d) => d.device)).toEqual(["cpu"]);
  });
});

describe("bundles.gen.ts", () => {
  it("is what gen-protocol.mjs makes from the current bundles.json (else run `npm run gen:protocol -w kernel`)", () => {
    expect(readFileSync(bundlesOutputPath, "utf8")).toBe(generateBundlesFromFile());
  });

  it("declares each MIME type of the schema once, as the constant the builders write", () => {
    const mimes = JSON.parse(readFileSync(bundlesSchemaPath, "utf8"))["x-mime-types"] as Record<string, string>;
    expect(mimes).toEqual({ [CHAT_MIME]: "ChatBundle", [TRAIN_MIME]: "TrainBundle", [GPU_MIME]: "GpuBundle" });
    expect(Object.keys(chatBundle({ state: "done", messages: [] }).data)).toContain(CHAT_MIME);
  });

  it("takes a gauge's device from protocol.json's DeviceMemory, for the types and for validation", () => {
    expect(readFileSync(bundlesOutputPath, "utf8")).toMatch(/export type DeviceGauge = DeviceMemory & \{/);
    expect(schema.$defs.DeviceMemory).toEqual(JSON.parse(readFileSync(schemaPath, "utf8")).$defs.DeviceMemory);
    const device = { device: "cuda:0", kind: "cuda", used: 1, total: 2, history: [1] };
    const validate = ajv.getSchema(`${schema.$id}#/$defs/GpuBundle`)!;
    expect(validate({ version: 1, devices: [device] })).toBe(true);
    // Rules that only protocol.json states: bytes are whole, and kind is one of two.
    expect(validate({ version: 1, devices: [{ ...device, used: 1.5 }] })).toBe(false);
    expect(validate({ version: 1, devices: [{ ...device, kind: "tpu" }] })).toBe(false);
  });

  it("refuses a protocol.json reference to a type the protocol does not define", () => {
    const bundles = {
      "x-mime-types": { "application/x-a": "ABundle" },
      $defs: { ABundle: { type: "object", properties: { version: { const: 1 }, d: { $ref: "protocol.json#/$defs/Nope" } } } },
    };
    expect(() => generateBundles(bundles, {})).toThrow(/protocol\.json#\/\$defs\/Nope is not in protocol\.json's \$defs/);
  });
});
