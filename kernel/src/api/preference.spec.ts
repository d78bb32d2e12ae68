import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import type { WorkerClient } from "../bridge/client";
import type { TrainBeginEvent, TrainProgressEvent, TrainReply, TrainRequest } from "../bridge/protocol.gen";
import { TRAIN_MIME, type TrainBundle } from "../display/bundles";
import { recordingSink, type RecordingSink } from "../display/testutil";
import type { GpuGauge } from "./gpu";
import type { Model } from "./model";
import type { ModelTarget } from "./model-handle";
import { TrainPreview } from "./preview";
import { TrainRun } from "./train";
import { TrainResult } from "./train-result";

const dir = mkdtempSync(join(tmpdir(), "qwenbook-preference-spec-"));
const PAIRS = [{ prompt: "你是谁？", chosen: "臣妾甄嬛。", rejected: "我是一个AI助手。" }];
const FILE = join(dir, "pairs.jsonl");
writeFileSync(FILE, PAIRS.map((p) => JSON.stringify(p)).join("\n"));

const BEGIN: TrainBeginEvent = {
  total_steps: 2,
  steps_per_epoch: 1,
  start_step: 0,
  examples: 1,
  eval_examples: 0,
  rows_per_step: 1,
  trainable_params: 1000,
  total_params: 100000,
  device: "cpu",
  dataset: { sources: [], examples: 1, too_long: 0, truncated: 0, dropped_too_long: 0, dropped_no_answer: 0, tokens: 40, trained_tokens: 12, max_length: 64, notes: [] },
  notes: [],
  config: { method: "lora", preference: { method: "dpo", beta: 0.2 }, init_adapter: join(dir, "sft"), output_dir: "/x" },
};

function progress(step: number, margin: number, accuracy: number): TrainProgressEvent {
  return {
    step, total_steps: 2, epoch: step, loss: 0.69 - margin / 10, lr: 1e-4, grad_norm: 1, tokens_per_s: 100, eta_s: 1,
    "rewards/chosen": margin / 2, "rewards/rejected": -margin / 2, "rewards/margins": margin, "rewards/accuracies": accuracy,
    "logps/chosen": -20, "logps/rejected": -30,
  };
}

const REPLY: TrainReply = {
  status: "ok", outcome: "completed", method: "lora", output_dir: join(dir, "runs", "dpo"), adapter_path: join(dir, "runs", "dpo"),
  step: 2, total_steps: 2, epoch: 2, final_loss: 0.5, tokens: 80, tokens_per_s: 100, elapsed_s: 1, checkpoints: [], dataset: BEGIN.dataset,
  history: [
    { kind: "train_progress", step: 1, loss: 0.69, "rewards/margins": 0, "rewards/accuracies": 0 },
    { kind: "train_progress", step: 2, loss: 0.5, "rewards/margins": 0.8, "rewards/accuracies": 1 },
  ],
  notes: [], preference: "dpo", final_metrics: { "rewards/margins": 0.8, "rewards/accuracies": 1 },
};

function target(sink: RecordingSink = recordingSink()) {
  const sent: Array<{ type: string; content: unknown }> = [];
  const client = {
    async request(type: string, content: TrainRequest, options: { onEvent?: (e: { type: string; content: unknown }) => void } = {}) {
      sent.push({ type, content });
      if (type === "train_preview") {
        const answer = (text: string) => ({ tokens: 9, trained_tokens: 3, truncated: false, segments: [{ text: "<|im_start|>user\n你是谁？", trained: false }, { text, trained: true }] });
        return { status: "ok", examples: [], pairs: [{ source: FILE, row: 1, chosen: answer("臣妾甄嬛。"), rejected: answer("我是一个AI助手。") }] };
      }
      options.onEvent?.({ type: "train_begin", content: BEGIN });
      options.onEvent?.({ type: "train_progress", content: progress(1, 0, 0) });
      options.onEvent?.({ type: "train_progress", content: progress(2, 0.8, 1) });
      return REPLY;
    },
  };
  const t: ModelTarget = {
    model: { id: "tiny-qwen2:fp32:cpu" } as unknown as Model,
    sink: () => sink,
    connect: async () => ({ client: client as unknown as WorkerClient, modelId: "tiny-qwen2:fp32:cpu" }),
    gauge: () => ({ stop() {} }) as unknown as GpuGauge,
  };
  return { t, sent, sink };
}

describe("the preference builder", () => {
  const { t } = target();

  it("sends the method, beta and the adapter it continues; LoRA unless full", async () => {
    const { t, sent } = target(recordingSink({ rich: false }));
    await TrainRun.preference(t, { method: "dpo", beta: 0.2, labelSmoothing: 0.1 }, join(dir, "sft"))
      .dataset(FILE).maxLength(64).batchSize(1).gradAccum(1).maxSteps(2).lr(5e-6).output(join(dir, "runs", "dpo")).quiet().train();
    expect(sent[0]!.content).toMatchObject({
      config: { method: "lora", preference: { method: "dpo", beta: 0.2, label_smoothing: 0.1 }, init_adapter: join(dir, "sft"), max_length: 64 },
      datasets: [{ path: FILE }],
    });
    const full = TrainRun.preference(t, { method: "simpo", gamma: 1, full: true });
    expect(full.settings).toMatchObject({ method: "full", preference: { method: "simpo", gamma: 1 } });
    expect(String(TrainRun.preference(t, { method: "orpo", lora: { r: 4 } }))).toMatch(/^TrainRun\(ORPO · LoRA r=4 on tiny-qwen2/);
  });

  it("refuses options that do not apply, before anything is sent", async () => {
    expect(() => TrainRun.preference(t, { method: "kto" as never })).toThrow(/method must be one of "dpo", "orpo", "simpo"/);
    expect(() => TrainRun.preference(t, { method: "orpo", labelSmoothing: 0.1 })).toThrow(/labelSmoothing applies to DPO only/);
    expect(() => TrainRun.preference(t, { labelSmoothing: 0.5 })).toThrow(/below 0\.5/);
    expect(() => TrainRun.preference(t, { gamma: 1 })).toThrow(/SimPO's target margin/);
    expect(() => TrainRun.preference(t, { beta: 0 })).toThrow(/beta must be greater than 0/);
    expect(() => TrainRun.preference(t, { full: true, lora: { r: 4 } })).toThrow(/give one of them/);
    expect(() => TrainRun.preference(t, { full: true }, join(dir, "sft"))).toThrow(/continues that adapter/);
    const run = TrainRun.preference(t, {});
    expect(() => run.devices(2)).toThrow(/devices\(n\): preference tuning runs on one device/);
    expect(() => run.strategy("fsdp")).toThrow(/one device/);
    expect(() => run.dataset(FILE, { format: "alpaca" })).toThrow(/format does not apply to a preference run/);
    await expect(run.dataset(FILE).packing().train()).rejects.toThrow(/packing\(\) does not apply to preference tuning/);
  });

  it("checks preference rows early, naming the row and field, and points supervised rows elsewhere", () => {
    const run = TrainRun.preference(t, {});
    expect(() => run.dataset([...PAIRS, { prompt: "hi", chosen: "a" }] as never)).toThrow(/dataset\(rows\), row 2, field "rejected": is missing/);
    expect(() => run.dataset([{ messages: [{ role: "user", content: "q" }, { role: "assistant", content: "a" }], chosen: "a", rejected: "b" }] as never)).toThrow(
      /row 1, field "messages\[1\]": must end with the user's turn/,
    );
    expect(() => run.dataset([{ prompt: "q", chosen: { role: "user", content: "x" }, rejected: "b" }] as never)).toThrow(/field "chosen.role": must be the assistant's/);
    expect(() => run.dataset([{ instruction: "q", output: "a" }] as never)).toThrow(/looks like supervised rows: train them with m.lora\(\)/);
    const bad = join(dir, "bad.jsonl");
    writeFileSync(bad, [JSON.stringify(PAIRS[0]), JSON.stringify({ prompt: "q", chosen: 3, rejected: "b" })].join("\n"));
    expect(() => run.dataset(bad)).toThrow(new RegExp(`${bad}, row 2, field "chosen": must be a string or an assistant message`));
    expect(run.dataset([{ messages: [{ role: "system", content: "s" }, { role: "user", content: "q" }], chosen: { role: "assistant", content: "a" }, rejected: "b" }]).settings.datasets).toHaveLength(1);
  });
});

describe("a preference run's dashboard, result and preview", () => {
  it("draws the rewards and accuracy live beside the loss and reports them in the result", async () => {
    const { t, sink } = target();
    const result = await TrainRun.preference(t, { beta: 0.2 }, join(dir, "sft")).dataset(FILE).output(join(dir, "runs", "dpo")).train();
    const bundles = sink.displays.filter((d) => TRAIN_MIME in d.data).map((d) => d.data[TRAIN_MIME] as TrainBundle);
    const last = bundles[bundles.length - 1]!;
    expect(last.title).toMatch(/^DPO beta=0\.2 · on sft · tiny-qwen2/);
    expect(last.train.metrics?.["rewards/margins"]).toEqual([0, 0.8]);
    expect(last.train.metrics?.["rewards/accuracies"]).toEqual([0, 1]);
    expect(last.config).toMatchObject({ preference: "dpo", beta: 0.2, initAdapter: join(dir, "sft") });
    expect(result).toBeInstanceOf(TrainResult);
    expect(result.preference).toBe("dpo");
    expect(result.finalMetrics["rewards/margins"]).toBe(0.8);
    expect(result.preferenceCurve["rewards/accuracies"]).toEqual([{ step: 1, value: 0 }, { step: 2, value: 1 }]);
    expect(String(result)).toMatch(/DPO margin 0\.8000 accuracy 1\.000/);
  });

  it("prints the margin and accuracy on a terminal's progress lines", async () => {
    const { t, sink } = target(recordingSink({ rich: false }));
    await TrainRun.preference(t, {}).dataset(FILE).output(join(dir, "runs", "dpo2")).train();
    expect(sink.texts.join("")).toMatch(/step 2\/2 .* · margin 0\.800 · accuracy 1\.00/);
  });

  it("previews both answers of each pair with the scored spans marked", async () => {
    const { t, sent } = target(recordingSink({ rich: false }));
    const preview = await TrainRun.preference(t, {}).dataset(FILE).preview(1);
    expect(sent[0]).toMatchObject({ type: "train_preview", content: { preference: true, n: 1 } });
    expect(preview).toBeInstanceOf(TrainPreview);
    expect(String(preview)).toBe("TrainPreview(1 pair)");
    const text = preview.text();
    expect(text).toContain("[chosen · 9 tokens, 3 scored]\n<|im_start|>user\n你是谁？⟦臣妾甄嬛。⟧");
    expect(text).toContain("[rejected · 9 tokens, 3 scored]\n<|im_start|>user\n你是谁？⟦我是一个AI助手。⟧");
    expect(preview.html()).toContain('title="scored">我是一个AI助手。</span>');
  });
});
