// A training run as the user watches it. In a notebook: the training dashboard, one output updated
// in place (throttled, always ending with a final update). In a terminal: one line per logged step.
import { randomUUID } from "node:crypto";
import type { CheckpointEvent, EvalEvent, TrainBeginEvent, TrainProgressEvent } from "../bridge/protocol.gen";
import { TrainRecorder, type ConfigValue, type ErrorInfo, type RichBundle, type TRAIN_MIME } from "./bundles";
import type { DisplaySink } from "./sink";
import { createThrottle, type ThrottleOptions } from "./throttle";

export interface TrainDisplayOptions {
  /** e.g. "LoRA r=8 · tiny-qwen2 · huanhuan.json". */
  title: string;
  /** The run's options in display order for the dashboard's config table, from what the worker says it runs with. */
  config: (begin: TrainBeginEvent) => Readonly<Record<string, ConfigValue>>;
  throttle?: ThrottleOptions;
}

/** How the run ended, for the last update. */
export interface TrainEnding {
  status: "completed" | "cancelled";
  step: number;
  totalSteps: number;
  /** The adapter or model folder a completed run wrote, or the checkpoint a cancelled one stopped at. */
  output?: string;
  elapsedS: number;
}

export interface TrainDisplay {
  begin(event: TrainBeginEvent): void;
  progress(event: TrainProgressEvent): void;
  evaluate(event: EvalEvent): void;
  checkpoint(event: CheckpointEvent): void;
  finish(ending: TrainEnding): void;
  /** The run failed; shows the error in the dashboard if it was already drawn. */
  fail(error: ErrorInfo): void;
}

/** The dashboard for notebooks, or the line log for terminals, as the sink can show. */
export function createTrainDisplay(sink: DisplaySink, options: TrainDisplayOptions): TrainDisplay {
  return sink.rich ? createTrainDashboard(sink, options) : createTrainLog(sink, options.title);
}

export function createTrainDashboard(sink: DisplaySink, options: TrainDisplayOptions): TrainDisplay {
  const id = randomUUID();
  let shown = false;
  let rec: TrainRecorder | undefined;
  let startedAt = Date.now();
  const updates = createThrottle((bundle: RichBundle<typeof TRAIN_MIME>) => {
    sink.display(bundle, { id, update: shown });
    shown = true;
  }, options.throttle);
  const elapsed = () => (Date.now() - startedAt) / 1000;
  return {
    begin(e) {
      startedAt = Date.now();
      // Rows cut to fit maxLength and similar facts are worth reading before the curve starts.
      for (const note of e.notes) sink.text(`note: ${note}\n`);
      const totalEpochs = Math.round((e.total_steps / e.steps_per_epoch) * 100) / 100;
      rec = new TrainRecorder({
        title: options.title,
        totalSteps: e.total_steps,
        totalEpochs,
        epochsOption: epochsOverridden(e, totalEpochs),
        config: options.config(e),
      });
      updates.push(rec.bundle());
    },
    progress(e) {
      if (!rec) return;
      const metrics = preferenceMetrics(e);
      rec.step({ step: e.step, loss: e.loss, lr: e.lr, epoch: e.epoch, tokensPerSecond: e.tokens_per_s, etaS: e.eta_s, elapsedS: elapsed(), ...(metrics ? { metrics } : {}) });
      updates.push(rec.bundle());
    },
    evaluate(e) {
      if (!rec) return;
      rec.evaluate(e.step, e.eval_loss);
      updates.push(rec.bundle());
    },
    checkpoint(e) {
      if (!rec) return;
      rec.checkpoint(e.path);
      updates.push(rec.bundle());
    },
    finish(ending) {
      if (!rec) return;
      if (ending.status === "completed" && ending.output) rec.checkpoint(ending.output);
      rec.finish(ending.status === "completed" ? "done" : "cancelled");
      updates.finish(rec.bundle());
    },
    fail(error) {
      if (!rec) {
        updates.cancel(); // nothing was drawn: the error reaches the cell as the call's rejection
        return;
      }
      rec.finish("failed", error);
      updates.finish(rec.bundle());
    },
  };
}

/** One line when the run starts, one per logged step, eval and checkpoint, and one at the end. */
export function createTrainLog(sink: DisplaySink, title: string): TrainDisplay {
  const line = (text: string) => sink.text(`[train] ${text}\n`);
  let total = 0;
  let begun = false;
  return {
    begin(e) {
      begun = true;
      total = e.total_steps;
      const epochs = e.total_steps / e.steps_per_epoch;
      const evalPart = e.eval_examples ? ` (+${e.eval_examples} held out for eval)` : "";
      const from = e.start_step ? `, resuming at step ${e.start_step}` : "";
      const asked = epochsOverridden(e, round(epochs, 2));
      const override = asked === undefined ? "" : `, maxSteps overrides epochs ${asked}`;
      line(
        `${title}: ${e.examples} examples${evalPart}, ${e.total_steps} steps (${round(epochs, 2)} epochs${override}, ${e.rows_per_step} rows per step)${from}; ` +
          `${count(e.trainable_params)} of ${count(e.total_params)} parameters trained on ${e.device}`,
      );
      for (const note of e.notes) line(`note: ${note}`);
    },
    progress(e) {
      const width = String(e.total_steps).length;
      line(
        `step ${String(e.step).padStart(width)}/${e.total_steps} · epoch ${e.epoch.toFixed(2)} · loss ${e.loss.toFixed(4)} · ` +
          `lr ${e.lr.toExponential(2)} · grad ${e.grad_norm.toFixed(2)} · ${Math.round(e.tokens_per_s)} tokens/s · ETA ${clock(e.eta_s)}` +
          preferenceLine(e) +
          (e.rank_memory ? ` · memory ${e.rank_memory.map((r) => `rank ${r.rank} ${(r.used / 2 ** 30).toFixed(1)} GiB`).join(", ")}` : ""),
      );
    },
    evaluate(e) {
      line(`step ${e.step}/${total} · eval loss ${e.eval_loss.toFixed(4)} (best ${e.best_eval_loss.toFixed(4)})`);
    },
    checkpoint(e) {
      if (e.reason === "periodic") line(`checkpoint at step ${e.step}: ${e.path}`);
    },
    finish(ending) {
      if (ending.status === "completed") {
        line(`done: ${ending.step} steps in ${clock(ending.elapsedS)}${ending.output ? `; saved ${ending.output}` : ""}`);
      } else {
        line(`cancelled at step ${ending.step}/${ending.totalSteps}${ending.output ? `; last checkpoint ${ending.output} (continue with .resume(...))` : ""}`);
      }
    },
    fail(error) {
      // Before the run began, the rejected call is the whole story; after, the log says where it stopped.
      if (begun) line(`failed: ${error.name}: ${error.message}`);
    },
  };
}

/**
 * The epochs the options asked for, when maxSteps replaced them as the run's length. The epoch
 * readout counts real passes over the data (8 steps of a 7-row set at 16 rows per step are 8
 * epochs), which reads as wrong next to .epochs(3) unless the dashboard says maxSteps decided.
 */
export function epochsOverridden(e: Pick<TrainBeginEvent, "config">, totalEpochs: number): number | undefined {
  const { epochs, max_steps: maxSteps } = e.config;
  if (typeof epochs !== "number" || typeof maxSteps !== "number") return undefined;
  return Math.abs(epochs - totalEpochs) < 0.005 ? undefined : epochs;
}

/** The preference metrics of a progress event (TRL's names), or undefined for a supervised run. */
export function preferenceMetrics(e: TrainProgressEvent): Record<string, number> | undefined {
  const out: Record<string, number> = {};
  for (const [key, value] of Object.entries(e)) {
    if (typeof value === "number" && /^(rewards\/|logps\/|nll_loss$|log_odds_)/.test(key)) out[key] = value;
  }
  return Object.keys(out).length > 0 ? out : undefined;
}

function preferenceLine(e: TrainProgressEvent): string {
  const margin = e["rewards/margins"];
  if (margin === undefined) return "";
  const odds = e.log_odds_ratio === undefined ? "" : ` · log odds ratio ${e.log_odds_ratio.toFixed(4)}`;
  return ` · margin ${margin.toFixed(3)} · accuracy ${(e["rewards/accuracies"] ?? 0).toFixed(2)}${odds}`;
}

function round(x: number, digits: number): number {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

function count(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}K`;
  return String(n);
}

/** 75 -> "1:15", 3725 -> "1:02:05". */
export function clock(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}
