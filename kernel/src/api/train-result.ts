import { inspect } from "node:util";
import type { DatasetStats, ReportLocations, TrainHistoryEntry, TrainReply } from "../bridge/protocol.gen";
import { MergeRequest } from "./merge";
import type { ModelHandle } from "./model-handle";
import { shortPath } from "./train-config";
import { tensorboardCommand } from "./train-report";

/** What the data became: rows per source, examples kept, tokens, and rows cut to fit maxLength. */
export interface DatasetReport {
  sources: Array<{ name: string; format: string; rows: number; samples: number }>;
  examples: number;
  /** Rows longer than maxLength (truncated, or dropped with truncation "drop"). */
  tooLong: number;
  truncated: number;
  droppedTooLong: number;
  /** Rows skipped because no answer token was left after truncation. */
  droppedNoAnswer: number;
  tokens: number;
  /** Tokens the loss was computed on: the answers. */
  trainedTokens: number;
  maxLength: number;
  notes: string[];
}

/** One logged step of a run. */
export interface LossPoint {
  step: number;
  loss: number;
  lr: number;
  gradNorm: number;
  epoch: number;
  tokensPerSecond: number;
}

export interface EvalPoint {
  step: number;
  loss: number;
}

export function toDatasetReport(d: DatasetStats): DatasetReport {
  return {
    sources: d.sources.map((s) => ({ ...s })),
    examples: d.examples,
    tooLong: d.too_long,
    truncated: d.truncated,
    droppedTooLong: d.dropped_too_long,
    droppedNoAnswer: d.dropped_no_answer,
    tokens: d.tokens,
    trainedTokens: d.trained_tokens,
    maxLength: d.max_length,
    notes: [...d.notes],
  };
}

/**
 * A finished fine-tuning run: completed, or cancelled (stopped by an interrupt after writing a
 * checkpoint it can be resumed from). For LoRA, `adapter` is a peft adapter folder; use it with
 * `m.withAdapter(result.adapter)`, or fold it into the base with `result.merge().save(path)`.
 */
export class TrainResult {
  readonly status: "completed" | "cancelled";
  readonly method: "lora" | "full";
  /** The run folder. */
  readonly outputDir: string;
  /** LoRA: the adapter folder (the run folder when completed, the last checkpoint when cancelled). */
  readonly adapter: string | undefined;
  /** Full fine-tuning: the model folder (load it with `qwen.load(result.modelPath)`). */
  readonly modelPath: string | undefined;
  readonly step: number;
  readonly totalSteps: number;
  readonly epoch: number;
  /** Loss of the last logged step. */
  readonly finalLoss: number | undefined;
  readonly bestEvalLoss: number | undefined;
  readonly finalEvalLoss: number | undefined;
  /** Tokens trained on, and how fast (this session of the run: a resumed run counts from where it resumed). */
  readonly tokens: number;
  readonly tokensPerSecond: number;
  readonly elapsedSeconds: number;
  /** Checkpoint folders, oldest first. */
  readonly checkpoints: readonly string[];
  readonly dataset: DatasetReport;
  /** Every logged step of the run, a resumed one's earlier steps included. */
  readonly losses: readonly LossPoint[];
  readonly evals: readonly EvalPoint[];
  readonly resumedFrom: string | undefined;
  /** What the worker noticed: rows truncated, data that changed since a checkpoint, precision caveats. */
  readonly notes: readonly string[];
  /** Where `.report(...)` wrote: `tensorboard` (the event files' folder), `wandb` (the offline run folder). */
  readonly reports: Readonly<ReportLocations>;
  /** A preference run's method ("dpo", "orpo", "simpo"); undefined for supervised fine-tuning. */
  readonly preference: "dpo" | "orpo" | "simpo" | undefined;
  /** A preference run's last reported metrics under TRL's names: "rewards/margins", "rewards/accuracies", ... */
  readonly finalMetrics: Readonly<Record<string, number>>;
  /** A preference run's metrics at each reported step, e.g. `result.preferenceCurve["rewards/accuracies"]`. */
  readonly preferenceCurve: Readonly<Record<string, ReadonlyArray<{ step: number; value: number }>>>;
  readonly #model: ModelHandle;

  constructor(reply: TrainReply, model: ModelHandle) {
    this.#model = model;
    this.status = reply.outcome;
    this.method = reply.method;
    this.outputDir = reply.output_dir;
    this.adapter = reply.adapter_path;
    this.modelPath = reply.model_path;
    this.step = reply.step;
    this.totalSteps = reply.total_steps;
    this.epoch = reply.epoch;
    this.finalLoss = reply.final_loss;
    this.bestEvalLoss = reply.best_eval_loss;
    this.finalEvalLoss = reply.final_eval_loss;
    this.tokens = reply.tokens;
    this.tokensPerSecond = reply.tokens_per_s;
    this.elapsedSeconds = reply.elapsed_s;
    this.checkpoints = Object.freeze([...reply.checkpoints]);
    this.dataset = toDatasetReport(reply.dataset);
    this.losses = Object.freeze(reply.history.filter(isProgress).map(toLossPoint));
    this.evals = Object.freeze(
      reply.history.filter((h) => h.kind === "eval" && h.eval_loss !== undefined).map((h) => ({ step: h.step, loss: h.eval_loss! })),
    );
    this.resumedFrom = reply.resumed_from;
    this.notes = Object.freeze([...reply.notes]);
    this.reports = Object.freeze({ ...reply.reports });
    this.preference = reply.preference;
    this.finalMetrics = Object.freeze({ ...(reply.final_metrics ?? {}) });
    const curve: Record<string, Array<{ step: number; value: number }>> = {};
    for (const h of reply.history.filter(isProgress)) {
      for (const [key, value] of Object.entries(h)) {
        if (typeof value === "number" && PREFERENCE_KEY.test(key)) (curve[key] ??= []).push({ step: h.step, value });
      }
    }
    this.preferenceCurve = Object.freeze(curve);
  }

  get cancelled(): boolean {
    return this.status === "cancelled";
  }

  /** The newest checkpoint: pass it to `.resume()` to go on. */
  get lastCheckpoint(): string | undefined {
    return this.checkpoints[this.checkpoints.length - 1];
  }

  /** `tensorboard --logdir <output>/runs`, when the run reported to TensorBoard; run it in a terminal and open the page it prints. */
  get tensorboardCommand(): string | undefined {
    return tensorboardCommand(this.reports);
  }

  /** The base model with this run's adapter folded in; `.save(path)` or `.export(file.gguf)` it. */
  merge(): MergeRequest {
    if (this.adapter === undefined) {
      throw new Error(
        `A full fine-tune has no adapter to merge: its complete weights are in ${this.modelPath ?? this.outputDir}; ` +
          "load them with qwen.load(result.modelPath)",
      );
    }
    return new MergeRequest(this.#model, this.adapter);
  }

  toString(): string {
    const first = this.losses[0]?.loss;
    const loss = first !== undefined && this.finalLoss !== undefined ? `, loss ${fmt(first)} → ${fmt(this.finalLoss)}` : "";
    const evalLoss = this.finalEvalLoss === undefined ? "" : `, eval ${fmt(this.finalEvalLoss)}`;
    const m = this.finalMetrics;
    const pref =
      this.preference === undefined || m["rewards/margins"] === undefined
        ? ""
        : `, ${this.preference.toUpperCase()} margin ${fmt(m["rewards/margins"])} accuracy ${fmt(m["rewards/accuracies"] ?? 0)}`;
    const where = this.adapter ?? this.modelPath ?? this.outputDir;
    const what = this.method === "lora" ? "adapter" : "model";
    return `TrainResult(${this.status}, step ${this.step}/${this.totalSteps}${loss}${evalLoss}${pref}, ${what} ${shortPath(where)})`;
  }
}

Object.defineProperty(TrainResult.prototype, inspect.custom, {
  value(this: TrainResult): string {
    return this.toString();
  },
});

/** History keys that are preference metrics (the worker names them as TRL does). */
const PREFERENCE_KEY = /^(rewards\/|logps\/|nll_loss$|log_odds_)/;

function isProgress(h: TrainHistoryEntry): boolean {
  return h.kind === "train_progress" && h.loss !== undefined;
}

function toLossPoint(h: TrainHistoryEntry): LossPoint {
  return {
    step: h.step,
    loss: h.loss!,
    lr: h.lr ?? 0,
    gradNorm: h.grad_norm ?? 0,
    epoch: h.epoch ?? 0,
    tokensPerSecond: h.tokens_per_s ?? 0,
  };
}

function fmt(x: number): string {
  return x.toPrecision(4);
}
