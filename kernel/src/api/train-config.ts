// A fine-tuning run's settings as the builder collects them (camelCase, only what was set), how they
// are checked, their wire form (the worker's TrainConfig, snake_case; unset options keep its
// defaults there), and how they read back in toString and the dashboard's config table.
import { basename } from "node:path";
import type { DistributedOptions, LoraOptions as WireLora, TrainBeginEvent, TrainOptions, TrainRequest } from "../bridge/protocol.gen";
import type { ConfigValue } from "../display/bundles";
import type { DatasetEntry } from "./datasets";
import { resolvePath } from "./paths";
import { expectInteger, expectKnownKeys, expectNumber, expectString } from "./validate";

export type TrainMethod = "lora" | "full";
export type Schedule = "cosine" | "linear" | "constant";
export const SCHEDULES: readonly Schedule[] = ["cosine", "linear", "constant"];
export type TrainDtype = "auto" | "bf16" | "fp16" | "fp32";
export const TRAIN_DTYPES: readonly TrainDtype[] = ["auto", "bf16", "fp16", "fp32"];
export type Optimizer = "adamw";
export type Truncation = "truncate" | "drop";

export interface LoraOptions {
  /** Rank of the update; 8 is what the Qwen tutorials use. */
  r?: number;
  /** The update is scaled by alpha / r; default 2 * r. */
  alpha?: number;
  /** Dropout on the LoRA input, in [0, 1); default 0. */
  dropout?: number;
  /** "all-linear" (the default: every projection, not the output head) or module names like ["q_proj", "v_proj"]. */
  targets?: "all-linear" | readonly string[];
}

export type Strategy = "ddp" | "fsdp";
export const STRATEGIES: readonly Strategy[] = ["ddp", "fsdp"];

export interface ClusterOptions {
  /** Ray Train workers; each is one rank. */
  workers: number;
  /** GPUs each worker gets (0 for CPU workers); default 0. */
  gpusPerWorker?: number;
  /** Seconds to wait for the cluster to answer; default 15. */
  connectTimeout?: number;
}

/** Where the ranks of a several-rank run come from: processes on the worker's host, or a Ray cluster. */
export interface DistributedSettings {
  readonly strategy?: Strategy;
  readonly devices?: number;
  readonly cluster?: Readonly<ClusterOptions & { address?: string }>;
}

/** What a builder holds. Immutable; each builder method makes a copy with one field changed. */
export interface TrainSettings {
  readonly method: TrainMethod;
  readonly lora?: Readonly<LoraOptions>;
  readonly datasets: readonly DatasetEntry[];
  readonly maxLength?: number;
  readonly truncation?: Truncation;
  readonly batchSize?: number;
  readonly gradAccum?: number;
  readonly epochs?: number;
  readonly maxSteps?: number;
  readonly lr?: number;
  readonly schedule?: Schedule;
  readonly warmup?: number;
  readonly optimizer?: Optimizer;
  readonly weightDecay?: number;
  readonly maxGradNorm?: number;
  readonly dtype?: TrainDtype;
  readonly gradientCheckpointing?: boolean;
  readonly packing?: boolean;
  readonly evalSplit?: number;
  readonly evalEvery?: number;
  readonly saveEvery?: number;
  readonly logEvery?: number;
  readonly seed?: number;
  /** Absolute path of the run folder. */
  readonly output?: string;
  /** Absolute path of the checkpoint (or run folder) to continue from. */
  readonly resume?: string;
  readonly overwrite?: boolean;
  readonly quiet?: boolean;
  readonly distributed?: DistributedSettings;
}

export function checkCluster(address: unknown, options: unknown): ClusterOptions & { address?: string } {
  const o = expectKnownKeys("cluster(address, options)", options, ["workers", "gpusPerWorker", "connectTimeout"]);
  const out: ClusterOptions & { address?: string } = {
    workers: expectInteger("cluster option workers", o.workers, { min: 1, hint: "the number of Ray Train workers, one rank each" }),
  };
  if (address !== undefined) out.address = expectString("cluster(address)", address, { nonEmpty: true });
  if (o.gpusPerWorker !== undefined) out.gpusPerWorker = expectNumber("cluster option gpusPerWorker", o.gpusPerWorker, { min: 0 });
  if (o.connectTimeout !== undefined) out.connectTimeout = expectNumber("cluster option connectTimeout", o.connectTimeout, { above: 0 });
  return out;
}

export function checkLora(options: unknown): LoraOptions {
  const o = expectKnownKeys("lora(options)", options, ["r", "alpha", "dropout", "targets"]);
  const out: LoraOptions = {};
  if (o.r !== undefined) out.r = expectInteger("lora option r", o.r, { min: 1, max: 4096 });
  if (o.alpha !== undefined) out.alpha = expectNumber("lora option alpha", o.alpha, { above: 0 });
  if (o.dropout !== undefined) {
    out.dropout = expectNumber("lora option dropout", o.dropout, { min: 0 });
    if (out.dropout >= 1) throw new RangeError(`lora option dropout must be less than 1, got ${out.dropout}`);
  }
  if (o.targets !== undefined) out.targets = checkTargets(o.targets);
  return out;
}

function checkTargets(value: unknown): "all-linear" | readonly string[] {
  if (value === "all-linear") return value;
  if (typeof value === "string") {
    throw new RangeError(`lora option targets must be "all-linear" or a list of module names like ["q_proj", "v_proj"], got ${JSON.stringify(value)}`);
  }
  if (!Array.isArray(value) || value.length === 0) {
    throw new TypeError('lora option targets expects "all-linear" or a non-empty list of module names like ["q_proj", "v_proj"]');
  }
  return Object.freeze(value.map((t: unknown, i: number) => expectString(`lora option targets[${i}]`, t, { nonEmpty: true })));
}

/** Options that only make sense together, checked when the run starts (the builder's order is free). */
export function checkComplete(s: TrainSettings): void {
  if (s.datasets.length === 0) {
    throw new Error('This run has no data: add some with .dataset("data/train.json", { format: "alpaca" }) before .train()');
  }
  if (s.evalEvery && !s.evalSplit) {
    throw new Error(`evalEvery(${s.evalEvery}) needs rows to evaluate on: add .evalSplit(0.1) (the fraction of rows held out)`);
  }
  if (s.resume !== undefined && s.overwrite) {
    throw new Error("resume() continues a run and overwrite() starts one afresh; use one of them");
  }
  const d = s.distributed;
  if (d?.strategy !== undefined && d.devices === undefined && d.cluster === undefined) {
    throw new Error(`strategy("${d.strategy}") splits a run over several ranks: add .devices(n) (GPUs of this machine) or .cluster(address, { workers })`);
  }
}

/** The wire form of the ranks, or undefined for a run in the worker itself (one device, DDP). */
export function toDistributed(d: DistributedSettings | undefined): DistributedOptions | undefined {
  if (d === undefined) return undefined;
  const strategy = d.strategy ?? "ddp";
  if (d.cluster !== undefined) {
    const c = d.cluster;
    return {
      strategy,
      cluster: {
        workers: c.workers,
        ...(c.address === undefined ? {} : { address: c.address }),
        ...(c.gpusPerWorker === undefined ? {} : { gpus_per_worker: c.gpusPerWorker }),
        ...(c.connectTimeout === undefined ? {} : { connect_timeout_s: c.connectTimeout }),
      },
    };
  }
  if (d.devices === undefined || (d.devices === 1 && strategy === "ddp")) return undefined;
  return { strategy, devices: d.devices };
}

/** The run folder when none was given: runs/<model>-<method>-<date>-<time>, next to the notebook. */
export function defaultOutput(modelLabel: string, method: TrainMethod, cwd: string, now = new Date()): string {
  const stamp = now.toISOString().replace(/\.\d+Z$/, "").replace(/[-:]/g, "").replace("T", "-");
  const model = (basename(modelLabel.split(":")[0] ?? modelLabel) || "model").replace(/[^\w.-]+/g, "_");
  return resolvePath(`runs/${model}-${method}-${stamp}`, cwd);
}

export function toTrainOptions(s: TrainSettings, output: string): TrainOptions {
  const c: TrainOptions = { output_dir: output, method: s.method };
  if (s.method === "lora" && s.lora) {
    const lora: WireLora = {};
    if (s.lora.r !== undefined) lora.r = s.lora.r;
    if (s.lora.alpha !== undefined) lora.alpha = s.lora.alpha;
    if (s.lora.dropout !== undefined) lora.dropout = s.lora.dropout;
    if (s.lora.targets !== undefined) lora.targets = s.lora.targets === "all-linear" ? "all-linear" : [...s.lora.targets];
    c.lora = lora;
  }
  const set = <K extends keyof TrainOptions>(key: K, value: TrainOptions[K] | undefined) => {
    if (value !== undefined) c[key] = value;
  };
  set("max_length", s.maxLength);
  set("truncation", s.truncation);
  set("batch_size", s.batchSize);
  set("grad_accum", s.gradAccum);
  set("epochs", s.epochs);
  set("max_steps", s.maxSteps);
  set("lr", s.lr);
  set("schedule", s.schedule);
  set("warmup", s.warmup);
  set("optimizer", s.optimizer);
  set("weight_decay", s.weightDecay);
  set("max_grad_norm", s.maxGradNorm);
  set("dtype", s.dtype);
  set("gradient_checkpointing", s.gradientCheckpointing);
  set("packing", s.packing);
  set("eval_split", s.evalSplit);
  set("eval_every", s.evalEvery);
  set("save_every", s.saveEvery);
  set("log_every", s.logEvery);
  set("seed", s.seed);
  set("resume_from", s.resume);
  set("overwrite", s.overwrite);
  return c;
}

export function toTrainRequest(modelId: string, s: TrainSettings, output: string): TrainRequest {
  const request: TrainRequest = { model_id: modelId, config: toTrainOptions(s, output), datasets: s.datasets.map((d) => d.wire) };
  const distributed = toDistributed(s.distributed);
  if (distributed !== undefined) request.distributed = distributed;
  return request;
}

/** "LoRA r=8 alpha=32" or "full fine-tune": how a run is named in toString and the dashboard title. */
export function methodLabel(s: TrainSettings): string {
  if (s.method === "full") return "full fine-tune";
  const l = s.lora ?? {};
  const parts = [`r=${l.r ?? 8}`];
  if (l.alpha !== undefined) parts.push(`alpha=${l.alpha}`);
  if (l.dropout) parts.push(`dropout=${l.dropout}`);
  if (l.targets !== undefined && l.targets !== "all-linear") parts.push(`targets=${l.targets.join(",")}`);
  return `LoRA ${parts.join(" ")}`;
}

/** The options that were set, in the order people read them, as [name, shown value]. */
export function settingRows(s: TrainSettings, cwd: string = process.cwd()): Array<[string, string | number | boolean]> {
  const rows: Array<[string, string | number | boolean | undefined]> = [
    ["maxLength", s.maxLength],
    ["truncation", s.truncation],
    ["batchSize", s.batchSize],
    ["gradAccum", s.gradAccum],
    ["epochs", s.epochs],
    ["maxSteps", s.maxSteps],
    ["lr", s.lr],
    ["schedule", s.schedule],
    ["warmup", s.warmup],
    ["optimizer", s.optimizer],
    ["weightDecay", s.weightDecay],
    ["maxGradNorm", s.maxGradNorm],
    ["dtype", s.dtype],
    ["gradientCheckpointing", s.gradientCheckpointing],
    ["packing", s.packing],
    ["evalSplit", s.evalSplit],
    ["evalEvery", s.evalEvery],
    ["saveEvery", s.saveEvery],
    ["logEvery", s.logEvery],
    ["seed", s.seed],
    ["resume", s.resume === undefined ? undefined : shortPath(s.resume, cwd)],
    ["overwrite", s.overwrite],
    ["devices", s.distributed?.devices],
    ["strategy", s.distributed?.strategy],
    ["cluster", s.distributed?.cluster === undefined ? undefined : clusterLabel(s.distributed.cluster)],
    ["output", s.output === undefined ? undefined : shortPath(s.output, cwd)],
  ];
  return rows.filter((r): r is [string, string | number | boolean] => r[1] !== undefined);
}

function clusterLabel(c: ClusterOptions & { address?: string }): string {
  const gpus = c.gpusPerWorker ? ` × ${c.gpusPerWorker} GPU` : "";
  return `${c.address ?? "$RAY_ADDRESS"} (${c.workers} workers${gpus})`;
}

/** A path relative to `cwd` when it lies inside it, so notebooks show "runs/x" rather than /home/.../runs/x. */
export function shortPath(path: string, cwd: string = process.cwd()): string {
  const prefix = cwd.endsWith("/") ? cwd : `${cwd}/`;
  return path.startsWith(prefix) ? path.slice(prefix.length) : path;
}

/** The config table: what the worker runs with (defaults filled in), under the builder's names. */
export function dashboardConfig(e: TrainBeginEvent, output: string, cwd: string): Record<string, ConfigValue> {
  const c = e.config as Record<string, unknown>;
  const lora = (c.lora ?? {}) as Record<string, unknown>;
  const out: Record<string, ConfigValue> = {};
  const put = (key: string, value: unknown) => {
    if (value === undefined || value === null) return;
    out[key] = typeof value === "object" ? JSON.stringify(value) : (value as ConfigValue);
  };
  put("method", c.method);
  if (c.method === "lora") {
    put("r", lora.r);
    put("alpha", lora.alpha ?? (typeof lora.r === "number" ? 2 * lora.r : undefined));
    put("dropout", lora.dropout);
    put("targets", Array.isArray(lora.targets) ? lora.targets.join(", ") : lora.targets);
  }
  const names: Array<[string, string]> = [
    ["max_length", "maxLength"], ["batch_size", "batchSize"], ["grad_accum", "gradAccum"], ["epochs", "epochs"],
    ["max_steps", "maxSteps"], ["lr", "lr"], ["schedule", "schedule"], ["warmup", "warmup"], ["optimizer", "optimizer"],
    ["weight_decay", "weightDecay"], ["max_grad_norm", "maxGradNorm"], ["dtype", "dtype"],
    ["gradient_checkpointing", "gradientCheckpointing"], ["packing", "packing"], ["eval_split", "evalSplit"],
    ["eval_every", "evalEvery"], ["save_every", "saveEvery"], ["seed", "seed"],
  ];
  for (const [wire, shown] of names) put(shown, c[wire]);
  put("examples", e.examples);
  if (e.eval_examples) put("evalExamples", e.eval_examples);
  put("trainableParams", e.trainable_params);
  put("device", e.device);
  put("ranks", e.world_size);
  put("strategy", e.strategy);
  if (e.resumed_from) put("resumedFrom", shortPath(e.resumed_from, cwd));
  put("output", shortPath(output, cwd));
  return out;
}
