import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { inspect } from "node:util";
import { describe, expect, it } from "vitest";
import type { WorkerClient } from "../bridge/client";
import { WorkerError } from "../bridge/errors";
import type { TrainBeginEvent, TrainReply, TrainRequest } from "../bridge/protocol.gen";
import { TRAIN_MIME, type TrainBundle } from "../display/bundles";
import { recordingSink, type RecordingSink } from "../display/testutil";
import { adapterPath } from "./adapters";
import { datasetEntry, SelfCognition } from "./datasets";
import type { GpuGauge } from "./gpu";
import type { Model } from "./model";
import type { ModelTarget } from "./model-handle";
import { TrainPreview } from "./preview";
import { TrainRun } from "./train";
import { TrainResult } from "./train-result";
import { clock } from "../display/train-display";

const dir = mkdtempSync(join(tmpdir(), "qwenbook-train-spec-"));
mkdirSync(join(dir, "data"));
writeFileSync(join(dir, "data", "huanhuan.json"), JSON.stringify([{ instruction: "你是谁？", input: "", output: "臣妾甄嬛。" }]));
const DATA = join(dir, "data", "huanhuan.json");
const ROWS = [{ instruction: "你是谁？", input: "", output: "我是甄嬛。" }];

const BEGIN: TrainBeginEvent = {
  total_steps: 3,
  steps_per_epoch: 1.5,
  start_step: 0,
  examples: 9,
  eval_examples: 1,
  rows_per_step: 16,
  trainable_params: 540_672,
  total_params: 10_270_000,
  device: "cpu",
  dataset: { sources: [], examples: 10, too_long: 2, truncated: 2, dropped_too_long: 0, dropped_no_answer: 0, tokens: 400, trained_tokens: 120, max_length: 384, notes: [] },
  notes: ["2 of 10 rows are longer than max_length=384 tokens and were truncated"],
  config: { method: "lora", lora: { r: 8, alpha: 32, dropout: 0.1, targets: "all-linear" }, max_length: 384, batch_size: 4, lr: 0.0001, output_dir: "/x" },
};

function reply(outcome: "completed" | "cancelled", step: number, adapter: string): TrainReply {
  return {
    status: "ok",
    outcome,
    method: "lora",
    output_dir: join(dir, "runs", "h"),
    adapter_path: adapter,
    step,
    total_steps: 3,
    epoch: step / 1.5,
    final_loss: 1.5,
    tokens: 1200,
    tokens_per_s: 3000,
    elapsed_s: 0.4,
    checkpoints: [adapter],
    dataset: BEGIN.dataset,
    history: [
      { kind: "train_progress", step: 1, loss: 2.5, lr: 1e-4, grad_norm: 1, tokens_per_s: 3000, epoch: 0.67 },
      { kind: "eval", step: 1, eval_loss: 2.2 },
    ],
    notes: BEGIN.notes,
  };
}

type Script = (emit: (type: string, content: unknown) => void, request: TrainRequest) => TrainReply | Error;

/** A target whose client answers `train` by running `script`, and records what was sent. */
function target(script: Script, sink: RecordingSink = recordingSink()) {
  const sent: TrainRequest[] = [];
  const gauges: Array<{ stopped: boolean }> = [];
  const client = {
    async request(type: string, content: TrainRequest, options: { onEvent?: (e: { type: string; content: unknown }) => void } = {}) {
      if (type !== "train") throw new Error(`unexpected ${type}`);
      sent.push(content);
      const out = script((t, c) => options.onEvent?.({ type: t, content: c }), content);
      if (out instanceof Error) throw out;
      return out;
    },
  };
  const t: ModelTarget = {
    model: { id: "tiny-qwen2:fp32:cpu" } as unknown as Model,
    sink: () => sink,
    connect: async () => ({ client: client as unknown as WorkerClient, modelId: "tiny-qwen2:fp32:cpu" }),
    gauge: () => {
      const g = { stopped: false, stop: () => void (g.stopped = true) };
      gauges.push(g);
      return g as unknown as GpuGauge;
    },
  };
  return { t, sent, gauges, sink };
}

const trainBundles = (sink: RecordingSink) => sink.displays.filter((d) => TRAIN_MIME in d.data);

describe("the training builder", () => {
  const { t } = target(() => new Error("not used"));

  it("checks each option as it is set and leaves the builder it came from unchanged", () => {
    const run = TrainRun.lora(t, { r: 8, alpha: 32, dropout: 0.1, targets: "all-linear" });
    const longer = run.maxLength(384);
    expect(run.settings.maxLength).toBeUndefined();
    expect(longer.settings.maxLength).toBe(384);
    expect(() => run.batchSize(0)).toThrow(RangeError);
    expect(() => run.batchSize(2.5)).toThrow(/batchSize\(n\) must be a whole number/);
    expect(() => run.evalSplit(1)).toThrow(/must be a fraction below 1/);
    expect(() => run.evalSplit(-0.1)).toThrow(RangeError);
    expect(() => run.lr(Number.NaN)).toThrow(/finite/);
    expect(() => run.adamBetas([0.9, 1])).toThrow(/adamBetas\(betas\)\[1\] must be below 1/);
    expect(() => run.adamBetas([0.9] as unknown as [number, number])).toThrow(/expects two numbers/);
    expect(() => run.adamEps(0)).toThrow(/adamEps\(x\) must be greater than 0/);
    expect(() => run.compile("yes" as unknown as boolean)).toThrow(TypeError);
    expect(() => run.epochs(0)).toThrow(/greater than 0/);
    expect(() => run.dtype("int8" as never)).toThrow(/dtype\(d\) must be one of "auto", "bf16", "fp16", "fp32"/);
    expect(() => run.optimizer("sgd" as never)).toThrow(/"adamw"/);
    expect(() => run.schedule("cosine", { warmpu: 0.1 } as never)).toThrow(/no option "warmpu"/);
    expect(() => run.gradientCheckpointing("yes" as never)).toThrow(TypeError);
    expect(() => run.activationMemoryGb(-1)).toThrow(/activationMemoryGb\(gb\) must be at least 0/);
    expect(() => TrainRun.lora(t, { dropout: 1 })).toThrow(/dropout must be less than 1/);
    expect(() => TrainRun.lora(t, { targets: "all" as never })).toThrow(/"all-linear" or a list of module names/);
    expect(() => TrainRun.lora(t, { targets: [] })).toThrow(/non-empty list/);
    expect(() => run.train({ signal: "now" } as never)).toThrow(/AbortSignal/);
  });

  it("sends the options that were set under the worker's names, with absolute paths", async () => {
    const { t, sent } = target(() => reply("completed", 3, join(dir, "runs", "h")), recordingSink({ rich: false }));
    const run = TrainRun.lora(t, { r: 8, alpha: 32, dropout: 0.1, targets: ["q_proj", "v_proj"] })
      .dataset(DATA, { format: "alpaca" })
      .dataset(new SelfCognition({ name: "小黄", author: "魔搭", nameEn: "Xiao Huang" }), { samples: 500 })
      .dataset(ROWS)
      .maxLength(384).batchSize(4).gradAccum(4).epochs(3).lr(1e-4)
      .schedule("cosine", { warmup: 0.1 }).evalSplit(0.1).evalEvery(50).saveEvery(100)
      .seed(7).gradientCheckpointing().activationMemoryGb(4.5).packing().optimizer("adamw").dtype("bf16")
      .output(join(dir, "runs", "h"))
      .quiet();
    await run.train();
    expect(sent[0]).toEqual({
      model_id: "tiny-qwen2:fp32:cpu",
      config: {
        output_dir: join(dir, "runs", "h"), method: "lora", lora: { r: 8, alpha: 32, dropout: 0.1, targets: ["q_proj", "v_proj"] },
        max_length: 384, batch_size: 4, grad_accum: 4, epochs: 3, lr: 1e-4, schedule: "cosine", warmup: 0.1, optimizer: "adamw",
        dtype: "bf16", gradient_checkpointing: true, activation_memory_gb: 4.5, packing: true, eval_split: 0.1, eval_every: 50, save_every: 100, seed: 7,
      },
      datasets: [
        { path: DATA, format: "alpaca" },
        { self_cognition: { name: "小黄", author: "魔搭", name_en: "Xiao Huang" }, samples: 500 },
        { rows: ROWS },
      ],
    });
    const full = TrainRun.full(t).dataset(ROWS).resume(join(dir, "data"));
    expect(full.settings).toMatchObject({ method: "full", resume: join(dir, "data"), output: join(dir, "data") });
    expect(full.settings.lora).toBeUndefined();
  });

  it("reports to TensorBoard and/or wandb, and says where TensorBoard should look", async () => {
    const run = TrainRun.lora(t).dataset(ROWS);
    expect(run.report("tensorboard").settings.report).toEqual(["tensorboard"]);
    expect(run.report(["tensorboard", "wandb"]).settings.report).toEqual(["tensorboard", "wandb"]);
    expect(run.report("wandb").report("none").settings.report).toBeUndefined();
    expect(() => run.report("mlflow" as never)).toThrow(/report\(to\) must be one of "tensorboard", "wandb", "none", got "mlflow"/);
    expect(() => run.report(["wandb", "wandb"])).toThrow(/names "wandb" twice/);
    expect(() => run.report(["none", "wandb"])).toThrow(/"none" turns reporting off/);
    expect(() => run.report([])).toThrow(/needs a target/);
    const out = join(dir, "runs", "h");
    const logdir = join(out, "runs", "Dec02_17-30-00_host");
    const { t: reporting, sent } = target(() => ({ ...reply("completed", 3, out), reports: { tensorboard: logdir } }), recordingSink({ rich: false }));
    const result = await TrainRun.lora(reporting).dataset(ROWS).report("tensorboard").output(out).quiet().train();
    expect(sent[0]!.config.report).toEqual(["tensorboard"]);
    expect(result.reports).toEqual({ tensorboard: logdir });
    expect(result.tensorboardCommand).toBe(`tensorboard --logdir ${join(out, "runs")}`);
    expect(new TrainResult(reply("completed", 3, out), reporting.model as never).tensorboardCommand).toBeUndefined();
  });

  it("shows its configuration as text", () => {
    const run = TrainRun.lora(t, { r: 8, alpha: 32, dropout: 0.1 }).dataset(DATA, { format: "alpaca" }).maxLength(384).lr(1e-4).packing().output(join(process.cwd(), "runs", "h"));
    expect(inspect(run)).toBe(
      "TrainRun(LoRA r=8 alpha=32 dropout=0.1 on tiny-qwen2:fp32:cpu\n  datasets: huanhuan.json (alpaca)\n  maxLength 384 · lr 1e-4 · packing\n  output: runs/h)",
    );
    expect(String(TrainRun.full(t))).toContain("datasets: none yet (add .dataset(...))");
  });

  it("refuses incomplete runs before anything is sent", async () => {
    const { t, sent } = target(() => reply("completed", 3, "x"));
    await expect(TrainRun.lora(t).train()).rejects.toThrow(/This run has no data/);
    await expect(TrainRun.lora(t).dataset(ROWS).evalEvery(10).train()).rejects.toThrow(/evalEvery\(10\) needs rows to evaluate on/);
    await expect(TrainRun.lora(t).dataset(ROWS).resume(dir).overwrite().train()).rejects.toThrow(/use one of them/);
    expect(sent).toEqual([]);
  });

  it("splits a run over ranks of this machine or a Ray cluster, keeping the global batch", async () => {
    const { t, sent } = target(() => reply("completed", 3, "x"), recordingSink({ rich: false }));
    const run = TrainRun.lora(t, { r: 16 }).dataset(ROWS).gradAccum(4).quiet();
    await run.devices(2).strategy("ddp").train();
    expect(sent[0].distributed).toEqual({ strategy: "ddp", devices: 2 });
    expect(sent[0].config.grad_accum).toBe(4); // the global count; the worker splits it over the ranks
    await TrainRun.full(t).dataset(ROWS).devices(4).strategy("fsdp").quiet().train();
    expect(sent[1].distributed).toEqual({ strategy: "fsdp", devices: 4 });
    await run.cluster("ray://head:10001", { workers: 8, gpusPerWorker: 1, connectTimeout: 5 }).train();
    expect(sent[2].distributed).toEqual({ strategy: "ddp", cluster: { workers: 8, address: "ray://head:10001", gpus_per_worker: 1, connect_timeout_s: 5 } });
    await run.cluster({ workers: 2 }).strategy("fsdp").train();
    expect(sent[3].distributed).toEqual({ strategy: "fsdp", cluster: { workers: 2 } });
    // One device with DDP is an ordinary run in the worker.
    await run.devices(1).train();
    expect(sent[4].distributed).toBeUndefined();
    expect(String(run.devices(2).strategy("ddp"))).toContain("devices 2 · strategy ddp");
    expect(String(run.cluster("ray://head:10001", { workers: 8, gpusPerWorker: 1 }))).toContain("cluster ray://head:10001 (8 workers × 1 GPU)");

    expect(() => run.devices(0)).toThrow(/devices\(n\) must be at least 1/);
    expect(() => run.strategy("zero3" as never)).toThrow(/"ddp", "fsdp"/);
    expect(() => run.devices(2).cluster({ workers: 2 })).toThrow(/not both/);
    expect(() => run.cluster({ workers: 2 }).devices(2)).toThrow(/not both/);
    expect(() => run.cluster({ workers: 0 })).toThrow(/cluster option workers must be at least 1/);
    expect(() => run.cluster("ray://h:1", { workers: 2, gpus: 1 } as never)).toThrow(/no option "gpus"/);
    await expect(run.strategy("fsdp").train()).rejects.toThrow(/add \.devices\(n\).*or \.cluster/);
    expect(sent).toHaveLength(5);
  });

  it("picks a run folder under runs/ when none was given", async () => {
    const { t, sent } = target(() => reply("completed", 3, "x"));
    await TrainRun.full(t).dataset(ROWS).quiet().train();
    expect(sent[0].config.output_dir).toMatch(new RegExp(`^${process.cwd()}/runs/tiny-qwen2-full-\\d{8}-\\d{6}$`));
  });
});

describe("datasets", () => {
  it("resolves file paths against the notebook's folder and snapshots rows", () => {
    expect(datasetEntry("data/huanhuan.json", { samples: 3, name: "hh" }, dir)).toEqual({ wire: { path: DATA, samples: 3, name: "hh" }, label: "hh (3 samples)" });
    const rows = [{ instruction: "a", output: "b" }];
    const entry = datasetEntry(rows, {}, dir);
    rows[0].output = "changed";
    expect(entry.wire.rows).toEqual([{ instruction: "a", output: "b" }]);
    expect(() => datasetEntry("data/none.json", {}, dir)).toThrow(`Dataset file not found: ${join(dir, "data", "none.json")}`);
    expect(() => datasetEntry("data", {}, dir)).toThrow(/is a folder/);
    expect(() => datasetEntry([1], {}, dir)).toThrow(/row 1 must be an object/);
    expect(() => datasetEntry(42, {}, dir)).toThrow(/expects a .json\/.jsonl file path, a list of rows/);
    expect(() => datasetEntry(rows, { format: "csv" }, dir)).toThrow(/must be one of "auto", "alpaca", "sharegpt"/);
  });

  it("builds the self-cognition set's options", () => {
    const s = new SelfCognition({ name: "小黄", author: "魔搭", languages: ["zh"] });
    expect(s.toWire()).toEqual({ name: "小黄", author: "魔搭", languages: ["zh"] });
    expect(String(s)).toBe("selfCognition(小黄, 魔搭)");
    expect(() => new SelfCognition({ name: " ", author: "a" })).toThrow(/name must not be blank/);
    expect(() => new SelfCognition({ name: "a" } as never)).toThrow(/needs the identity/);
    expect(() => new SelfCognition({ name: "a", author: "b", languages: ["fr" as never] })).toThrow(/must be one of "zh", "en"/);
    expect(() => datasetEntry(s, { format: "sharegpt" }, dir)).toThrow(/alpaca rows/);
  });
});

describe("the live dashboard", () => {
  const script: Script = (emit) => {
    emit("train_begin", BEGIN);
    emit("train_progress", { step: 1, total_steps: 3, epoch: 0.67, loss: 2.5, lr: 1e-4, grad_norm: 1.2, tokens_per_s: 3000, eta_s: 2 });
    emit("eval", { step: 1, eval_loss: 2.2, best_eval_loss: 2.2, eval_tokens: 40 });
    emit("train_progress", { step: 2, total_steps: 3, epoch: 1.33, loss: 1.9, lr: 5e-5, grad_norm: 1.1, tokens_per_s: 3100, eta_s: 1 });
    emit("checkpoint", { step: 2, path: join(dir, "runs", "h", "checkpoint-2"), reason: "periodic" });
    emit("train_progress", { step: 3, total_steps: 3, epoch: 2, loss: 1.5, lr: 0, grad_norm: 1, tokens_per_s: 3050, eta_s: 0 });
    return reply("completed", 3, join(dir, "runs", "h"));
  };

  it("draws one dashboard updated in place that ends done, with a memory gauge beside it", async () => {
    const { t, sink, gauges } = target(script);
    const result = await TrainRun.lora(t, { r: 8, alpha: 32 }).dataset(DATA).output(join(dir, "runs", "h")).train();
    expect(result.status).toBe("completed");
    const shown = trainBundles(sink);
    expect(shown[0].update).toBe(false);
    expect(shown.slice(1).every((d) => d.update && d.id === shown[0].id)).toBe(true);
    const last = shown[shown.length - 1].data[TRAIN_MIME] as TrainBundle;
    expect(last).toMatchObject({
      state: "done",
      title: "LoRA r=8 alpha=32 · tiny-qwen2 · huanhuan.json",
      progress: { step: 3, totalSteps: 3, totalEpochs: 2 },
      train: { step: [1, 2, 3], loss: [2.5, 1.9, 1.5] },
      eval: { step: [1], loss: [2.2] },
      checkpoint: join(dir, "runs", "h"),
    });
    expect(last.config).toMatchObject({ method: "lora", r: 8, alpha: 32, dropout: 0.1, maxLength: 384, batchSize: 4, examples: 9, evalExamples: 1 });
    expect(sink.texts).toEqual(["note: 2 of 10 rows are longer than max_length=384 tokens and were truncated\n"]);
    expect(gauges).toEqual([{ stopped: true, stop: expect.any(Function) }]);
    expect(sink.pins).toBe(1);
  });

  it("ends cancelled with the last checkpoint, and remembers the result for the next cell", async () => {
    const stop = join(dir, "runs", "h", "checkpoint-1");
    const { t, sink } = target((emit) => {
      emit("train_begin", BEGIN);
      emit("train_progress", { step: 1, total_steps: 3, epoch: 0.67, loss: 2.5, lr: 1e-4, grad_norm: 1, tokens_per_s: 3000, eta_s: 2 });
      emit("checkpoint", { step: 1, path: stop, reason: "cancel" });
      return reply("cancelled", 1, stop);
    });
    const run = TrainRun.lora(t).dataset(DATA);
    expect(run.result).toBeUndefined();
    const result = await run.train();
    expect(await run.result).toBe(result);
    expect(result).toMatchObject({ status: "cancelled", cancelled: true, adapter: stop, lastCheckpoint: stop });
    const shown = trainBundles(sink);
    expect(shown[shown.length - 1].data[TRAIN_MIME]).toMatchObject({ state: "cancelled", checkpoint: stop });
    expect(String(result)).toBe(`TrainResult(cancelled, step 1/3, loss 2.500 → 1.500, adapter ${stop})`);
  });

  it("shows a failure in the dashboard once it is drawn, and rejects with the worker's error", async () => {
    const oom = new WorkerError("train", "TrainingOutOfMemoryError", "out of memory on cuda:0 at step 2 (...). Try a smaller batch_size", []);
    const { t, sink } = target((emit) => (emit("train_begin", BEGIN), oom));
    await expect(TrainRun.lora(t).dataset(DATA).train()).rejects.toBe(oom);
    const shown = trainBundles(sink);
    expect(shown[shown.length - 1].data[TRAIN_MIME]).toMatchObject({ state: "failed", error: { name: "TrainingOutOfMemoryError" } });

    const early = target(() => new WorkerError("train", "DatasetError", "data.json, row 2, field \"output\": is missing", []));
    await expect(TrainRun.lora(early.t).dataset(DATA).train()).rejects.toThrow(/row 2, field "output"/);
    expect(early.sink.displays).toEqual([]);
  });

  it("prints one line per logged step in a terminal, and nothing when quiet", async () => {
    const { t, sink } = target(script, recordingSink({ rich: false }));
    await TrainRun.lora(t).dataset(DATA).output(join(process.cwd(), "runs", "h")).train();
    expect(sink.displays).toEqual([]);
    expect(sink.texts.join("")).toBe(
      [
        "[train] LoRA r=8 · tiny-qwen2 · huanhuan.json: 9 examples (+1 held out for eval), 3 steps (2 epochs, 16 rows per step); 540.7K of 10.27M parameters trained on cpu",
        "[train] note: 2 of 10 rows are longer than max_length=384 tokens and were truncated",
        "[train] step 1/3 · epoch 0.67 · loss 2.5000 · lr 1.00e-4 · grad 1.20 · 3000 tokens/s · ETA 0:02",
        "[train] step 1/3 · eval loss 2.2000 (best 2.2000)",
        "[train] step 2/3 · epoch 1.33 · loss 1.9000 · lr 5.00e-5 · grad 1.10 · 3100 tokens/s · ETA 0:01",
        `[train] checkpoint at step 2: ${join(dir, "runs", "h", "checkpoint-2")}`,
        "[train] step 3/3 · epoch 2.00 · loss 1.5000 · lr 0.00e+0 · grad 1.00 · 3050 tokens/s · ETA 0:00",
        `[train] done: 3 steps in 0:00; saved ${join(dir, "runs", "h")}`,
        "",
      ].join("\n"),
    );
    const quiet = target(script);
    await TrainRun.lora(quiet.t).dataset(DATA).quiet().train();
    expect(quiet.sink.displays).toEqual([]);
    expect(quiet.sink.texts).toEqual([]);
  });

  it("adds every rank's memory to a several-rank run's progress lines", async () => {
    const rank = (r: number) => ({ rank: r, device: `cuda:${r}`, name: "GPU", used: 17.2 * 2 ** 30, peak: 18 * 2 ** 30, total: 80 * 2 ** 30 });
    const { t, sink } = target((emit) => {
      emit("train_begin", { ...BEGIN, world_size: 2, strategy: "ddp" });
      emit("train_progress", { step: 1, total_steps: 3, epoch: 0.67, loss: 2.5, lr: 1e-4, grad_norm: 1.2, tokens_per_s: 3000, eta_s: 2, rank_memory: [rank(0), rank(1)] });
      return reply("completed", 3, join(dir, "runs", "h"));
    }, recordingSink({ rich: false }));
    await TrainRun.lora(t).dataset(DATA).devices(2).output(join(process.cwd(), "runs", "h")).train();
    expect(sink.texts.join("")).toContain("3000 tokens/s · ETA 0:02 · memory rank 0 17.2 GiB, rank 1 17.2 GiB\n");
  });

  it("formats durations as a clock", () => {
    expect([0, 75, 3725].map(clock)).toEqual(["0:00", "1:15", "1:02:05"]);
  });
});

describe("adapter sources", () => {
  it("are adapter folders, LoRA results or views; a full fine-tune's missing adapter says why", () => {
    mkdirSync(join(dir, "runs", "a"), { recursive: true });
    writeFileSync(join(dir, "runs", "a", "adapter_config.json"), "{}");
    expect(adapterPath(join(dir, "runs", "a"))).toBe(join(dir, "runs", "a"));
    const model = { id: "m" } as unknown as Model;
    expect(adapterPath(new TrainResult(reply("completed", 3, join(dir, "runs", "a")), model))).toBe(join(dir, "runs", "a"));
    const full = new TrainResult({ ...reply("completed", 3, "x"), method: "full", adapter_path: undefined, model_path: join(dir, "m") }, model);
    expect(() => adapterPath(full)).toThrow(/full fine-tune: it wrote a whole model/);
    expect(() => full.merge()).toThrow(/has no adapter to merge/);
    expect(() => adapterPath(undefined)).toThrow(/a full fine-tune's result has no adapter/);
    expect(() => adapterPath(join(dir, "data"))).toThrow(/is not a LoRA adapter folder/);
  });
});

describe("the preview", () => {
  it("marks trained spans in text and HTML and inspects as a one-line summary", () => {
    const p = new TrainPreview([
      {
        source: "data.json",
        row: 3,
        tokens: 20,
        trained_tokens: 5,
        truncated: true,
        segments: [
          { text: "<|im_start|>user\n<b>hi</b><|im_end|>\n<|im_start|>assistant\n", trained: false },
          { text: "hello<|im_end|>", trained: true },
          { text: "\n", trained: false },
        ],
      },
    ]);
    expect(p.text()).toBe(
      "── example 1 · data.json row 3 · 20 tokens, 5 trained, truncated to maxLength ──\n" +
        "<|im_start|>user\n<b>hi</b><|im_end|>\n<|im_start|>assistant\n⟦hello<|im_end|>⟧\n\n" +
        "⟦…⟧ marks what the loss is computed on (the answers); everything else is masked (-100)",
    );
    expect(p.html()).toContain("&lt;b&gt;hi&lt;/b&gt;");
    expect(p.html()).toContain('title="trained">hello&lt;|im_end|&gt;</span>');
    expect(inspect(p)).toBe("TrainPreview(1 example)");
  });
});
