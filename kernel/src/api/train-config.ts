// A fine-tuning run's settings as the builder collects them (camelCase, only what was set), how they
// are checked, their wire form (the worker's TrainConfig, snake_case; unset options keep its
// defaults there), and how they read back in toString and the dashboard's config table.
// The options themselves (names, enums, defaults) come from protocol.json's TrainOptions through
// protocol.gen.ts: a field added there reaches the settings, the wire form, toString and the dashboard
// with no list here to edit (the builder method that sets it lives in train.ts).
import { basename } from "node:path";
import {
  DISTRIBUTED_OPTIONS_ENUMS,
  LORA_OPTIONS_DEFAULTS,
  TRAIN_OPTIONS_ENUMS,
  TRAIN_OPTIONS_FIELDS,
  type DistributedOptions,
  type LoraOptions as WireLora,
  type PreferenceOptions as WirePreference,
  type TrainBeginEvent,
  type TrainOptions,
  type TrainRequest,
} from "../bridge/protocol.gen";
import type { ConfigValue } from "../display/bundles";
import type { DatasetEntry } from "./datasets";
import { resolvePath } from "./paths";
import { expectBoolean, expectInteger, expectKnownKeys, expectNumber, expectOneOf, expectString } from "./validate";

export type TrainMethod = (typeof TRAIN_OPTIONS_ENUMS.method)[number];
export type Schedule = (typeof TRAIN_OPTIONS_ENUMS.schedule)[number];
export const SCHEDULES: readonly Schedule[] = TRAIN_OPTIONS_ENUMS.schedule;
export type TrainDtype = (typeof TRAIN_OPTIONS_ENUMS.dtype)[number];
export const TRAIN_DTYPES: readonly TrainDtype[] = TRAIN_OPTIONS_ENUMS.dtype;
export type Optimizer = (typeof TRAIN_OPTIONS_ENUMS.optimizer)[number];
export type Truncation = (typeof TRAIN_OPTIONS_ENUMS.truncation)[number];

/** A wire option's name in the notebook API: "max_grad_norm" -> "maxGradNorm". */
type CamelCase<S extends string> = S extends `${infer Head}_${infer Tail}` ? `${Head}${Capitalize<CamelCase<Tail>>}` : S;

/** The two folders read as output(path) and resume(path) in the builder. */
const RENAMED = { output_dir: "output", resume_from: "resume" } as const;
type Renamed = keyof typeof RENAMED;

/** Set by how a run is made (m.lora(options), m.fullFinetune(), m.preference(options), an adapter view's
 * builders), not by an option of its own. */
const STRUCTURAL = ["method", "lora", "preference", "init_adapter"] as const;

/** A TrainOptions field the builder sets one value at a time. */
export type TrainOptionField = Exclude<(typeof TRAIN_OPTIONS_FIELDS)[number], (typeof STRUCTURAL)[number]>;
export type TrainOptionName<K extends TrainOptionField = TrainOptionField> = K extends Renamed ? (typeof RENAMED)[K] : CamelCase<K>;

/** The builder's name for each wire option. */
export function optionName<K extends TrainOptionField>(field: K): TrainOptionName<K> {
  const renamed = (RENAMED as Partial<Record<TrainOptionField, string>>)[field];
  return (renamed ?? field.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase())) as TrainOptionName<K>;
}

/** Every wire option with its builder name, in schema order: [wire, builder]. */
export const TRAIN_OPTIONS: ReadonlyArray<readonly [TrainOptionField, TrainOptionName]> = TRAIN_OPTIONS_FIELDS.filter(
  (f): f is TrainOptionField => !(STRUCTURAL as readonly string[]).includes(f),
).map((f) => [f, optionName(f)] as const);

/** The options a builder holds, under their builder names; each is optional: unset keeps the worker's default. */
export type TrainOptionSettings = { readonly [K in TrainOptionField as TrainOptionName<K>]?: TrainOptions[K] };

export interface LoraOptions {
  /** Rank of the update; 8 is what the Qwen tutorials use. */
  r?: number;
  /** The update is scaled by alpha / r; default 2 * r. */
  alpha?: number;
  /** Dropout on the LoRA input, in [0, 1); default 0. */
  dropout?: number;
  /**
   * "all-linear" (the default: every projection, not the output head; on a mixture-of-experts model such as
   * Qwen3-MoE the expert weights too) or module names like ["q_proj", "v_proj"], where "experts" names the
   * expert weights.
   */
  targets?: "all-linear" | readonly string[];
}

export type PreferenceMethod = NonNullable<WirePreference["method"]>;
export const PREFERENCE_METHODS = ["dpo", "orpo", "simpo"] as const satisfies readonly PreferenceMethod[];

/** What `m.preference(options)` takes: the preference loss and how the model is trained. */
export interface PreferenceRunOptions {
  /** "dpo" (against a reference: the model before tuning), "orpo" (NLL + odds ratio) or "simpo" (no reference). */
  method?: PreferenceMethod;
  /** DPO: the pull toward the reference; ORPO: the odds-ratio weight (lambda); SimPO: the reward scale.
   * Default 0.1 for DPO and ORPO, 2.0 for SimPO. */
  beta?: number;
  /** DPO only: the assumed fraction of flipped labels, in [0, 0.5) (conservative DPO); default 0. */
  labelSmoothing?: number;
  /** SimPO only: the target reward margin; default 0.5. */
  gamma?: number;
  /** LoRA settings (the default way to train); not with `full`, nor on an adapter view (the adapter's own). */
  lora?: LoraOptions;
  /** Train every weight instead of a LoRA adapter; DPO's reference is then computed once before the first step. */
  full?: boolean;
}

/** The preference settings a run holds, checked. */
export interface PreferenceSettings {
  readonly method: PreferenceMethod;
  readonly beta?: number;
  readonly labelSmoothing?: number;
  readonly gamma?: number;
}

export function checkPreference(options: unknown, onAdapter: boolean): { preference: PreferenceSettings; lora?: LoraOptions; full: boolean } {
  const o = expectKnownKeys("preference(options)", options, ["method", "beta", "labelSmoothing", "gamma", "lora", "full"]);
  const method = o.method === undefined ? "dpo" : expectOneOf("preference option method", o.method, PREFERENCE_METHODS);
  const p: { method: PreferenceMethod; beta?: number; labelSmoothing?: number; gamma?: number } = { method };
  if (o.beta !== undefined) p.beta = expectNumber("preference option beta", o.beta, { above: 0, hint: "0.1 is usual for DPO and ORPO, 2 for SimPO" });
  if (o.labelSmoothing !== undefined) {
    if (method !== "dpo") throw new RangeError(`preference option labelSmoothing applies to DPO only, not ${method}; leave it out`);
    const e = expectNumber("preference option labelSmoothing", o.labelSmoothing, { min: 0 });
    if (e >= 0.5) throw new RangeError(`preference option labelSmoothing must be below 0.5 (the assumed fraction of flipped labels), got ${e}`);
    p.labelSmoothing = e;
  }
  if (o.gamma !== undefined) {
    if (method !== "simpo") throw new RangeError(`preference option gamma is SimPO's target margin; ${method} does not use it`);
    p.gamma = expectNumber("preference option gamma", o.gamma);
  }
  const full = o.full === undefined ? false : expectBoolean("preference option full", o.full);
  if (onAdapter && (full || o.lora !== undefined)) {
    throw new Error("preference() on an adapter view continues that adapter: its r, alpha and targets are the run's, so lora and full do not apply (use m.preference(...) on the base model for a fresh adapter)");
  }
  if (full && o.lora !== undefined) throw new Error("preference option full trains every weight, so lora settings do not apply; give one of them");
  const lora = o.lora === undefined ? undefined : checkLora(o.lora);
  return { preference: Object.freeze(p), ...(lora === undefined ? {} : { lora }), full };
}

export type Strategy = (typeof DISTRIBUTED_OPTIONS_ENUMS.strategy)[number];
export const STRATEGIES: readonly Strategy[] = DISTRIBUTED_OPTIONS_ENUMS.strategy;

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

/**
 * What a builder holds. Immutable; each builder method makes a copy with one field changed. `output`
 * and `resume` are absolute paths (the run folder; the checkpoint or run folder to continue from).
 */
export interface TrainSettings extends TrainOptionSettings {
  readonly method: TrainMethod;
  readonly lora?: Readonly<LoraOptions>;
  /** Preference tuning (DPO, ORPO, SimPO) on chosen/rejected pairs; absent: supervised fine-tuning. */
  readonly preference?: PreferenceSettings;
  /** The adapter folder a LoRA run continues (an adapter view's builders set it). */
  readonly initAdapter?: string;
  readonly datasets: readonly DatasetEntry[];
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
  if (s.preference !== undefined && s.packing) {
    throw new Error("packing() does not apply to preference tuning: each pair's chosen and rejected answers are scored whole; leave it out");
  }
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
  if (s.preference !== undefined) {
    const p = s.preference;
    c.preference = {
      method: p.method,
      ...(p.beta === undefined ? {} : { beta: p.beta }),
      ...(p.labelSmoothing === undefined ? {} : { label_smoothing: p.labelSmoothing }),
      ...(p.gamma === undefined ? {} : { gamma: p.gamma }),
    };
  }
  if (s.initAdapter !== undefined) c.init_adapter = s.initAdapter;
  for (const [field, name] of TRAIN_OPTIONS) {
    // The folder is the caller's: the one set, or the default made from the model and the date.
    if (field === "output_dir") continue;
    // TrainOptionSettings gives each builder name its wire field's type, so the value is the wire's own
    // (TypeScript cannot follow a key and its renamed twin through a loop, hence the untyped assign).
    const value = s[name];
    if (value !== undefined) Object.assign(c, { [field]: Array.isArray(value) ? [...value] : value });
  }
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
  if (s.preference !== undefined) {
    const p = s.preference;
    const how = s.initAdapter !== undefined ? `on ${basename(s.initAdapter)}` : trainingLabel(s);
    return `${p.method.toUpperCase()}${p.beta === undefined ? "" : ` beta=${p.beta}`} · ${how}`;
  }
  return trainingLabel(s);
}

function trainingLabel(s: TrainSettings): string {
  if (s.method === "full") return "full fine-tune";
  const l = s.lora ?? {};
  const parts = [`r=${l.r ?? LORA_OPTIONS_DEFAULTS.r}`];
  if (l.alpha !== undefined) parts.push(`alpha=${l.alpha}`);
  if (l.dropout) parts.push(`dropout=${l.dropout}`);
  if (l.targets !== undefined && l.targets !== "all-linear") parts.push(`targets=${l.targets.join(",")}`);
  return `LoRA ${parts.join(" ")}`;
}

/** The options that were set, in the order people read them, as [name, shown value]. */
export function settingRows(s: TrainSettings, cwd: string = process.cwd()): Array<[string, string | number | boolean]> {
  const rows: Array<[string, string | number | boolean | undefined]> = [
    // The options in schema order; the run folder, shown last, after where the ranks come from.
    ...TRAIN_OPTIONS.filter(([field]) => field !== "output_dir").map(([field, name]): [string, string | number | boolean | undefined] => {
      const value = s[name];
      if (field === "resume_from" && typeof value === "string") return [name, shortPath(value, cwd)];
      return [name, Array.isArray(value) ? value.join(", ") : value];
    }),
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
    // An empty list (report: the dashboard only) reads better as "none" than as [].
    if (Array.isArray(value) && value.length === 0) out[key] = "none";
    else out[key] = typeof value === "object" ? JSON.stringify(value) : (value as ConfigValue);
  };
  put("method", c.method);
  const preference = c.preference as Record<string, unknown> | null | undefined;
  if (preference) {
    put("preference", preference.method);
    // An absent beta is the method's default on the worker (protocol.json's PreferenceOptions says which).
    put("beta", preference.beta ?? (preference.method === "simpo" ? 2 : 0.1));
    if (preference.method === "dpo" && preference.label_smoothing) put("labelSmoothing", preference.label_smoothing);
    if (preference.method === "simpo") put("gamma", preference.gamma);
  }
  if (typeof c.init_adapter === "string") put("initAdapter", shortPath(c.init_adapter, cwd));
  if (c.method === "lora") {
    put("r", lora.r);
    // An absent alpha is 2 * r on the worker (protocol.json's LoraOptions says so; it has no fixed default).
    put("alpha", lora.alpha ?? (typeof lora.r === "number" ? 2 * lora.r : undefined));
    put("dropout", lora.dropout);
    put("targets", Array.isArray(lora.targets) ? lora.targets.join(", ") : lora.targets);
  }
  // Every option as the worker runs it; the folders show below as output and resumedFrom (when it resumed).
  for (const [wire, shown] of TRAIN_OPTIONS) if (wire !== "output_dir" && wire !== "resume_from") put(shown, c[wire]);
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
