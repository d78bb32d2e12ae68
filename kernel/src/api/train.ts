import { existsSync } from "node:fs";
import { inspect } from "node:util";
import { errorInfo } from "../display/error-info";
import { markShown } from "../display/shown";
import { createTrainDisplay, type TrainDisplay } from "../display/train-display";
import { drawTrainEvents, finishTrainDisplay } from "./train-events";
import { datasetEntry, type DatasetInput, type DatasetOptions } from "./datasets";
import { resolvePath } from "./paths";
import type { GpuGauge } from "./gpu";
import type { ModelTarget } from "./model-handle";
import { TrainPreview } from "./preview";
import type { PreferenceRow } from "./preference-rows";
import {
  checkComplete,
  checkLora,
  checkPreference,
  type PreferenceRunOptions,
  dashboardConfig,
  defaultOutput,
  methodLabel,
  SCHEDULES,
  settingRows,
  toTrainRequest,
  TRAIN_DTYPES,
  type LoraOptions,
  type Schedule,
  type TrainDtype,
  type TrainSettings,
  type Truncation,
  checkCluster,
  type ClusterOptions,
  STRATEGIES,
  type Strategy,
} from "./train-config";
import { TrainResult } from "./train-result";
import { checkReport, type ReportChoice } from "./train-report";
import { expectBoolean, expectInteger, expectKnownKeys, expectNumber, expectOneOf, expectString } from "./validate";

/**
 * A fine-tuning run being put together: `m.lora({ r: 8 })` or `m.fullFinetune()`, then datasets and
 * options, then `await run.train()`. Each option returns a new builder and checks its value at
 * once; nothing reaches the worker before `train()` or `preview()`.
 */
export class TrainRun {
  readonly #target: ModelTarget;
  readonly #s: TrainSettings;
  /** Where relative paths point: the notebook's folder when the builder was made. */
  readonly #cwd: string;
  #result: Promise<TrainResult> | undefined;

  private constructor(target: ModelTarget, settings: TrainSettings, cwd: string) {
    this.#target = target;
    this.#s = Object.freeze(settings);
    this.#cwd = cwd;
  }

  /** A LoRA run (peft adapters on the frozen base); what `m.lora(options)` returns. */
  static lora(target: ModelTarget, options: LoraOptions = {}): TrainRun {
    return new TrainRun(target, { method: "lora", lora: Object.freeze(checkLora(options)), datasets: [] }, process.cwd());
  }

  /**
   * Preference tuning on chosen/rejected pairs; what `m.preference(options)` returns (LoRA unless `full`), and
   * `adapterView.preference(options)`, which continues `initAdapter` (for DPO also the reference).
   */
  static preference(target: ModelTarget, options: PreferenceRunOptions = {}, initAdapter?: string): TrainRun {
    const { preference, lora, full } = checkPreference(options, initAdapter !== undefined);
    const settings: TrainSettings = {
      method: full ? "full" : "lora",
      ...(lora === undefined ? {} : { lora: Object.freeze(lora) }),
      preference,
      ...(initAdapter === undefined ? {} : { initAdapter }),
      datasets: [],
    };
    return new TrainRun(target, settings, process.cwd());
  }

  /** Full-parameter fine-tuning; what `m.fullFinetune()` returns. */
  static full(target: ModelTarget): TrainRun {
    return new TrainRun(target, { method: "full", datasets: [] }, process.cwd());
  }

  /** The options set so far. */
  get settings(): TrainSettings {
    return this.#s;
  }

  #with(patch: Partial<TrainSettings>): TrainRun {
    return new TrainRun(this.#target, { ...this.#s, ...patch }, this.#cwd);
  }

  /**
   * Adds training data: a .json or .jsonl file (alpaca `{instruction, input, output}` or sharegpt
   * `{conversations: [{from, value}]}` rows), a list of such rows, or
   * `qwen.datasets.selfCognition({ name, author })`. Several datasets are mixed; `samples` draws
   * that many rows from one. A preference run takes `{ prompt | messages, chosen, rejected }` rows.
   */
  dataset(source: DatasetInput | readonly PreferenceRow[], options: DatasetOptions = {}): TrainRun {
    return this.#with({ datasets: [...this.#s.datasets, datasetEntry(source, options, this.#cwd, this.#s.preference !== undefined)] });
  }

  /** Longest example in tokens; longer rows are truncated (counted and reported). */
  maxLength(n: number): TrainRun {
    return this.#with({ maxLength: expectInteger("maxLength(n)", n, { min: 2 }) });
  }

  /** What happens to rows longer than maxLength: "truncate" (default) or "drop". */
  truncation(mode: Truncation): TrainRun {
    return this.#with({ truncation: expectOneOf("truncation(mode)", mode, ["truncate", "drop"] as const) });
  }

  /** Rows per forward pass; the effective batch is batchSize × gradAccum. */
  batchSize(n: number): TrainRun {
    return this.#with({ batchSize: expectInteger("batchSize(n)", n, { min: 1, hint: "rows per forward pass" }) });
  }

  /** Forward passes whose gradients add up to one optimizer step. */
  gradAccum(n: number): TrainRun {
    return this.#with({ gradAccum: expectInteger("gradAccum(n)", n, { min: 1 }) });
  }

  /** Passes over the data; may be fractional. Ignored when maxSteps is set. */
  epochs(n: number): TrainRun {
    return this.#with({ epochs: expectNumber("epochs(n)", n, { above: 0 }) });
  }

  /** Stop after this many optimizer steps (instead of a number of epochs). */
  maxSteps(n: number): TrainRun {
    return this.#with({ maxSteps: expectInteger("maxSteps(n)", n, { min: 1 }) });
  }

  /** Peak learning rate: about 1e-4 for LoRA, 1e-5 for full fine-tuning. */
  lr(rate: number): TrainRun {
    return this.#with({ lr: expectNumber("lr(rate)", rate, { above: 0, hint: "LoRA usually uses 1e-4, full fine-tuning 1e-5" }) });
  }

  /** Learning-rate schedule after warmup; `warmup` is a fraction of the steps (< 1) or a number of steps. */
  schedule(name: Schedule, options: { warmup?: number } = {}): TrainRun {
    const o = expectKnownKeys("schedule(name, options)", options, ["warmup"]);
    const schedule = expectOneOf("schedule(name)", name, SCHEDULES);
    return this.#with(o.warmup === undefined ? { schedule } : { schedule, warmup: checkWarmup("schedule option warmup", o.warmup) });
  }

  /** Warmup: a fraction of all steps (< 1) or a whole number of steps. */
  warmup(amount: number): TrainRun {
    return this.#with({ warmup: checkWarmup("warmup(amount)", amount) });
  }

  /** The optimizer; AdamW is the one there is. */
  optimizer(name: "adamw"): TrainRun {
    return this.#with({ optimizer: expectOneOf("optimizer(name)", name, ["adamw"] as const) });
  }

  weightDecay(x: number): TrainRun {
    return this.#with({ weightDecay: expectNumber("weightDecay(x)", x, { min: 0 }) });
  }

  /** AdamW's two decay rates, each in [0, 1) (default [0.9, 0.999]). */
  adamBetas(betas: readonly [number, number]): TrainRun {
    if (!Array.isArray(betas) || betas.length !== 2) {
      throw new TypeError(`adamBetas(betas) expects two numbers, like [0.9, 0.999], got ${JSON.stringify(betas)}`);
    }
    const hint = "each in [0, 1), like [0.9, 0.999]";
    const checked = betas.map((b, i) => expectNumber(`adamBetas(betas)[${i}]`, b, { min: 0, hint }));
    for (const [i, b] of checked.entries()) {
      if (b >= 1) throw new RangeError(`adamBetas(betas)[${i}] must be below 1, got ${b} (${hint})`);
    }
    return this.#with({ adamBetas: [checked[0]!, checked[1]!] });
  }

  /** AdamW's epsilon, added to the denominator (default 1e-8). */
  adamEps(x: number): TrainRun {
    return this.#with({ adamEps: expectNumber("adamEps(x)", x, { above: 0, hint: "like 1e-8" }) });
  }

  /** torch.compile each decoder layer: faster GPU steps after a compile of a minute or so at the start; each new
   * batch shape compiles again, so pair it with packing(). On a CPU it rarely pays. On a GPU, steps of one shape
   * then replay from a CUDA graph, and with gradientCheckpointing() a LoRA run's layers keep what
   * activationMemoryGb() allows instead of recomputing whole layers. */
  compile(on = true): TrainRun {
    return this.#with({ compile: expectBoolean("compile(on)", on) });
  }

  /** Clip the gradient norm to this (default 1); 0 turns clipping off. */
  maxGradNorm(x: number): TrainRun {
    return this.#with({ maxGradNorm: expectNumber("maxGradNorm(x)", x, { min: 0 }) });
  }

  /** Compute precision; "auto" is bf16 on GPUs that have it and fp32 on CPU. */
  dtype(d: TrainDtype): TrainRun {
    return this.#with({ dtype: expectOneOf("dtype(d)", d, TRAIN_DTYPES) });
  }

  /** Recompute activations in the backward pass: much less memory for about 30% more time. */
  gradientCheckpointing(on = true): TrainRun {
    return this.#with({ gradientCheckpointing: expectBoolean("gradientCheckpointing(on)", on) });
  }

  /**
   * With gradientCheckpointing() in a compiled LoRA run: GiB of extra activations the layers may keep so that
   * backward recomputes less (selective checkpointing: attention first, then the MLP). 0 recomputes whole layers;
   * the default is a quarter of the GPU's free memory once the model is loaded.
   */
  activationMemoryGb(gb: number): TrainRun {
    return this.#with({ activationMemoryGb: expectNumber("activationMemoryGb(gb)", gb, { min: 0, hint: "GiB" }) });
  }

  /** Pack several short rows into each maxLength row (they still cannot attend to each other). */
  packing(on = true): TrainRun {
    return this.#with({ packing: expectBoolean("packing(on)", on) });
  }

  /** Fraction of rows held out to measure eval loss, in [0, 1). */
  evalSplit(fraction: number): TrainRun {
    const f = expectNumber("evalSplit(fraction)", fraction, { min: 0, hint: "the fraction of rows held out, e.g. 0.1" });
    if (f >= 1) throw new RangeError(`evalSplit(fraction) must be a fraction below 1 of the rows held out (e.g. 0.1), got ${f}`);
    return this.#with({ evalSplit: f });
  }

  /** Evaluate every n steps (and at the end); needs evalSplit. */
  evalEvery(n: number): TrainRun {
    return this.#with({ evalEvery: expectInteger("evalEvery(n)", n, { min: 0 }) });
  }

  /** Write a checkpoint every n steps; one is always written at the end and on cancel. */
  saveEvery(n: number): TrainRun {
    return this.#with({ saveEvery: expectInteger("saveEvery(n)", n, { min: 0 }) });
  }

  /** Report progress every n steps (default 1). */
  logEvery(n: number): TrainRun {
    return this.#with({ logEvery: expectInteger("logEvery(n)", n, { min: 1 }) });
  }

  /** Seed for the data order, the eval split and the LoRA initialization. */
  seed(n: number): TrainRun {
    return this.#with({ seed: expectInteger("seed(n)", n, { min: 0 }) });
  }

  /** The run folder (checkpoints and the result); default runs/<model>-<method>-<time>. */
  output(path: string): TrainRun {
    return this.#with({ output: resolvePath(expectString("output(path)", path, { nonEmpty: true }), this.#cwd) });
  }

  /** Continue from a checkpoint-<step> folder, or a run folder's newest checkpoint. */
  resume(path: string): TrainRun {
    const given = expectString("resume(path)", path, { nonEmpty: true });
    const abs = resolvePath(given, this.#cwd);
    if (!existsSync(abs)) throw new Error(`No checkpoint at ${abs} (from ${JSON.stringify(given)}): pass a checkpoint-<step> folder or the run folder`);
    return this.#with({ resume: abs, ...(this.#s.output === undefined ? { output: runFolderOf(abs) } : {}) });
  }

  /**
   * Trains on `n` ranks on the worker's machine (torchrun), one GPU each, or CPU processes on a CPU-only
   * worker. The global batch stays batchSize × gradAccum rows, as on one device, so gradAccum must be a
   * multiple of `n`; checkpoints resume on any number of devices.
   */
  devices(n: number): TrainRun {
    this.#oneDevice("devices(n)");
    if (this.#s.distributed?.cluster !== undefined) {
      throw new Error("This run already trains on a Ray cluster (.cluster(...)); use devices(n) for one machine or cluster() for several, not both");
    }
    const devices = expectInteger("devices(n)", n, { min: 1, hint: "the number of GPUs (ranks) to train on" });
    return this.#with({ distributed: { ...this.#s.distributed, devices } });
  }

  /** How several ranks share the work: "ddp" (a whole model on each; LoRA) or "fsdp" (FSDP2: weights sharded; full fine-tuning, large bases). */
  strategy(name: Strategy): TrainRun {
    this.#oneDevice("strategy(name)");
    return this.#with({ distributed: { ...this.#s.distributed, strategy: expectOneOf("strategy(name)", name, STRATEGIES) } });
  }

  /**
   * Trains on a Ray cluster with Ray Train's TorchTrainer: `cluster("ray://head:10001", { workers: 8, gpusPerWorker: 1 })`,
   * or `cluster({ workers })` to use RAY_ADDRESS. The output folder must be one every worker can write.
   */
  cluster(address: string | ClusterOptions, options?: ClusterOptions): TrainRun {
    this.#oneDevice("cluster(...)");
    if (this.#s.distributed?.devices !== undefined) {
      throw new Error(`This run already trains on devices(${this.#s.distributed.devices}) of the worker's machine; use devices(n) for one machine or cluster() for several, not both`);
    }
    const [where, o] = typeof address === "string" ? [address, options] : [undefined, address];
    const cluster = Object.freeze(checkCluster(where, o));
    return this.#with({ distributed: { ...this.#s.distributed, cluster } });
  }

  #oneDevice(call: string): void {
    if (this.#s.preference !== undefined) {
      throw new Error(`${call}: preference tuning runs on one device for now (the worker's); leave devices, strategy and cluster out`);
    }
  }

  /**
   * Also writes the dashboard's series (loss, eval loss, learning rate, grad norm, tokens/s, memory), at the same
   * steps and under the Trainer's tags (train/loss, eval/loss, ...), for other tools: "tensorboard" (event files
   * in <output>/runs/; `result.tensorboardCommand` says how to open them), "wandb" (an offline run in
   * <output>/wandb; needs `pip install wandb` in the worker's Python), both as a list, or "none" (the default).
   */
  report(to: ReportChoice | readonly ReportChoice[]): TrainRun {
    const targets = checkReport("report(to)", to);
    return this.#with({ report: targets === undefined ? undefined : [...targets] });
  }

  /** Start afresh in an output folder that holds another run's checkpoints (they are deleted). */
  overwrite(on = true): TrainRun {
    return this.#with({ overwrite: expectBoolean("overwrite(on)", on) });
  }

  /** Train without the dashboard or progress lines. */
  quiet(on = true): TrainRun {
    return this.#with({ quiet: expectBoolean("quiet(on)", on) });
  }

  /**
   * Shows the first `n` examples as the model will be trained on them: rendered through its chat
   * template, with the spans the loss is computed on marked (for a preference run, each pair's chosen and
   * rejected answers after their shared prompt).
   */
  async preview(n = 3): Promise<TrainPreview> {
    expectInteger("preview(n)", n, { min: 1, max: 100 });
    if (this.#s.datasets.length === 0) throw new Error('Nothing to preview: add data with .dataset("data/train.json") first');
    const { client, modelId } = await this.#target.connect();
    const reply = await client.request("train_preview", {
      model_id: modelId,
      datasets: this.#s.datasets.map((d) => d.wire),
      n,
      ...(this.#s.maxLength === undefined ? {} : { max_length: this.#s.maxLength }),
      ...(this.#s.seed === undefined ? {} : { seed: this.#s.seed }),
      ...(this.#s.preference === undefined ? {} : { preference: true }),
    });
    const preview = new TrainPreview(reply.examples, reply.pairs ?? []);
    if (this.#s.quiet) return preview;
    this.#target.sink().display({ data: { "text/plain": preview.text(), "text/html": preview.html() } });
    return markShown(preview);
  }

  /**
   * Trains, showing a live dashboard (in a terminal, one line per step), and resolves to the
   * result. The kernel's interrupt button cancels: the run stops at the next step, writes a
   * checkpoint and resolves with status "cancelled" (find it in `run.result` when the cell was
   * interrupted). In a program, aborting `signal` does the same.
   */
  train(options: { signal?: AbortSignal } = {}): Promise<TrainResult> {
    const o = expectKnownKeys("train(options)", options, ["signal"]);
    if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw new TypeError("train option signal expects an AbortSignal");
    const running = this.#train(o.signal as AbortSignal | undefined);
    this.#result = running;
    // The cell may have been interrupted and stopped listening; the dashboard shows any failure.
    running.catch(() => undefined);
    return running;
  }

  /** The latest `train()` of this builder, also after the cell that awaited it was interrupted. */
  get result(): Promise<TrainResult> | undefined {
    return this.#result;
  }

  async #train(signal: AbortSignal | undefined): Promise<TrainResult> {
    const s = this.#s;
    checkComplete(s);
    const output = s.output ?? defaultOutput(this.#target.model.id, s.method, this.#cwd);
    const base = this.#target.sink();
    // Updates that arrive after an interrupt ended the cell still belong to its output.
    const sink = base.pin?.() ?? base;
    const { client, modelId } = await this.#target.connect();
    const display: TrainDisplay | undefined = s.quiet ? undefined : createTrainDisplay(sink, { title: this.#title(), config: (e) => dashboardConfig(e, output, this.#cwd) });
    let gauge: GpuGauge | undefined;
    let reply;
    try {
      reply = await client.request("train", toTrainRequest(modelId, s, output), {
        signal,
        onEvent: drawTrainEvents(display, this.#cwd, (event) => {
          // The memory gauge sits under the dashboard, from the run's start; it shows every rank's memory.
          if (event.type === "train_begin" && display && sink.rich) gauge = this.#target.gauge(sink);
          if (event.type === "train_progress" && event.content.rank_memory) gauge?.showRanks(event.content.rank_memory);
        }),
      });
    } catch (error) {
      display?.fail(errorInfo(error));
      throw display ? markShown(error) : error;
    } finally {
      gauge?.stop();
    }
    const result = new TrainResult(reply, this.#target.model);
    finishTrainDisplay(display, result, this.#cwd);
    // The dashboard's last line says how the run ended; the cell need not print TrainResult(…) under it.
    return display ? markShown(result) : result;
  }

  #title(): string {
    const model = this.#target.model.id.split(":")[0];
    return [methodLabel(this.#s), model, this.#s.datasets.map((d) => d.label).join(" + ")].filter(Boolean).join(" · ");
  }

  toString(): string {
    const s = this.#s;
    const lines = [`TrainRun(${methodLabel(s)} on ${this.#target.model.id}`];
    lines.push(s.datasets.length ? `  datasets: ${s.datasets.map((d) => d.label).join(" + ")}` : "  datasets: none yet (add .dataset(...))");
    const rows = settingRows(s, this.#cwd);
    const options = rows.filter(([k]) => k !== "output" && k !== "resume").map(([k, v]) => (v === true ? k : `${k} ${fmt(v)}`));
    if (options.length) lines.push(`  ${options.join(" · ")}`);
    for (const [k, v] of rows.filter(([key]) => key === "resume" || key === "output")) lines.push(`  ${k}: ${v}`);
    if (s.quiet) lines.push("  quiet");
    return `${lines.join("\n")})`;
  }
}

Object.defineProperty(TrainRun.prototype, inspect.custom, {
  value(this: TrainRun): string {
    return this.toString();
  },
});

function checkWarmup(name: string, value: unknown): number {
  const w = expectNumber(name, value, { min: 0 });
  if (w >= 1 && !Number.isInteger(w)) {
    throw new RangeError(`${name} must be a fraction of the steps below 1 (e.g. 0.1) or a whole number of steps, got ${w}`);
  }
  return w;
}

/** A checkpoint-<step> folder continues its run folder; a run folder continues itself. */
function runFolderOf(path: string): string {
  return /\/checkpoint-\d+\/?$/.test(path) ? path.replace(/\/checkpoint-\d+\/?$/, "") : path.replace(/\/$/, "");
}

function fmt(v: string | number | boolean): string {
  if (typeof v === "number" && v !== 0 && Math.abs(v) < 1e-3) return v.toExponential();
  return String(v);
}
