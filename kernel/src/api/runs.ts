// Training runs as the worker keeps them, for a kernel that restarted while a run went on:
// `await qwen.runs()` lists them and `run.watch()` redraws the dashboard from the run's history,
// then follows it live until it ends. The worker also records each run on disk, so a run whose
// worker crashed is listed as "interrupted" at its last complete checkpoint, and `run.resume()`
// continues it.
import { inspect } from "node:util";
import type { WorkerClient } from "../bridge/client";
import type { LoadRequest, RunInfo, RunResume, TrainRequest } from "../bridge/protocol.gen";
import { readRunIndex } from "../bridge/run-index";
import { errorInfo } from "../display/error-info";
import type { DisplaySink } from "../display/sink";
import { createTrainDisplay } from "../display/train-display";
import type { Model } from "./model";
import { dashboardConfig, shortPath } from "./train-config";
import { drawTrainEvents, finishTrainDisplay } from "./train-events";
import { TrainResult } from "./train-result";
import { expectBoolean, expectKnownKeys } from "./validate";

export type RunState = RunInfo["state"];

export interface RunHost {
  connection(): Promise<WorkerClient>;
  sink(): DisplaySink;
  /** Loads (or finds loaded) the model a run trained, in the current worker; what resume() continues on. */
  load(request: LoadRequest): Promise<Model>;
}

export interface ResumeOptions {
  /** Aborting cancels the continued run (it writes a checkpoint and resolves "cancelled"). */
  signal?: AbortSignal;
  /** Train without the dashboard or progress lines. */
  quiet?: boolean;
}

export interface WatchOptions {
  /** Aborting stops watching; the run goes on. */
  signal?: AbortSignal;
  /** Replay and follow without drawing anything (the promise still resolves when the run ends). */
  quiet?: boolean;
}

/** A training run in the worker, as it was when listed (call `qwen.runs()` again for fresh figures). */
export class TrainingRun {
  /** The msg_id of the train request that started the run. */
  readonly runId: string;
  readonly modelId: string;
  readonly outputDir: string;
  /** The session of the client (kernel) that started it. */
  readonly session: string;
  readonly started: Date;
  readonly state: RunState;
  readonly step: number;
  readonly totalSteps: number | undefined;
  /** Why a failed run failed. */
  readonly error: string | undefined;
  /** The newest complete checkpoint folder: where `resume()` continues from. */
  readonly checkpoint: string | undefined;
  /** When it ended; for an interrupted run, when a new worker found it cut short. */
  readonly ended: Date | undefined;
  /** For a "resumed" run: the id of the run that continued it. */
  readonly resumedBy: string | undefined;
  readonly #resume: RunResume | undefined;
  readonly #host: RunHost;

  constructor(info: RunInfo, host: RunHost) {
    this.runId = info.run_id;
    this.modelId = info.model_id;
    this.outputDir = info.output_dir;
    this.session = info.session;
    this.started = new Date(info.started);
    this.state = info.state;
    this.step = info.step;
    this.totalSteps = info.total_steps;
    this.error = info.error;
    this.checkpoint = info.checkpoint;
    this.ended = info.ended === undefined ? undefined : new Date(info.ended);
    this.resumedBy = info.resumed_by;
    this.#resume = info.resume;
    this.#host = host;
  }

  /**
   * Continues an interrupted (or cancelled) run from its last complete checkpoint: loads its model
   * into the current worker if needed, trains on with the same options and data into the same
   * folder, and resolves with the result, as `.resume(checkpoint)` on the original builder would.
   */
  async resume(options: ResumeOptions = {}): Promise<TrainResult> {
    const o = expectKnownKeys("resume(options)", options, ["signal", "quiet"]);
    if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw new TypeError("resume option signal expects an AbortSignal");
    const quiet = o.quiet === undefined ? false : expectBoolean("resume option quiet", o.quiet);
    const id = this.runId.slice(0, 8);
    let client = await this.#host.connection();
    // This object is a snapshot: ask the worker how the run stands now, so a run is not resumed twice.
    const now = (await client.request("runs", {})).runs.find((r) => r.run_id === this.runId);
    const state = now?.state ?? this.state;
    const checkpoint = now ? now.checkpoint : this.checkpoint;
    const recipe = now ? now.resume : this.#resume;
    if (state !== "interrupted" && state !== "cancelled") {
      const why = state === "resumed" ? `it was already resumed as run ${now?.resumed_by?.slice(0, 8)}` : `it is ${state}`;
      throw new Error(`Run ${id} cannot be resumed: ${why}; only interrupted or cancelled runs can (list them again with qwen.runs())`);
    }
    if (checkpoint === undefined) {
      throw new Error(`Run ${id} has no complete checkpoint in ${this.outputDir} to resume from; train it again (use .saveEvery(n) to keep checkpoints)`);
    }
    if (recipe === undefined) {
      throw new Error(`Run ${id} was recorded without its options; continue it with .resume(${JSON.stringify(checkpoint)}) on a train builder`);
    }
    const model = await this.#host.load(recipe.load);
    client = await this.#host.connection();
    const { train } = recipe;
    const request: TrainRequest = {
      model_id: model.id,
      config: { ...train.config, resume_from: checkpoint },
      datasets: train.datasets,
      ...(train.distributed === undefined ? {} : { distributed: train.distributed }),
    };
    const base = this.#host.sink();
    const sink = base.pin?.() ?? base;
    const cwd = process.cwd();
    const title = `${model.id.split(":")[0]} · resuming run ${id} from ${shortPath(checkpoint, cwd)}`;
    const display = quiet ? undefined : createTrainDisplay(sink, { title, config: (e) => dashboardConfig(e, this.outputDir, cwd) });
    let reply;
    try {
      reply = await client.request("train", request, {
        signal: o.signal as AbortSignal | undefined,
        onEvent: drawTrainEvents(display, cwd),
      });
    } catch (error) {
      display?.fail(errorInfo(error));
      throw error;
    }
    const result = new TrainResult(reply, model);
    finishTrainDisplay(display, result, cwd);
    return result;
  }

  /**
   * Re-attaches to the run: draws its dashboard from the events so far, follows it live, and
   * resolves with the run as it ended (or as it stood when `signal` stopped the watch).
   */
  async watch(options: WatchOptions = {}): Promise<TrainingRun> {
    const o = expectKnownKeys("watch(options)", options, ["signal", "quiet"]);
    if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw new TypeError("watch option signal expects an AbortSignal");
    const quiet = o.quiet === undefined ? false : expectBoolean("watch option quiet", o.quiet);
    const client = await this.#host.connection();
    const base = this.#host.sink();
    const sink = base.pin?.() ?? base;
    const cwd = process.cwd();
    const title = `${this.modelId.split(":")[0]} · run ${this.runId.slice(0, 8)} → ${shortPath(this.outputDir, cwd)}`;
    const display = quiet ? undefined : createTrainDisplay(sink, { title, config: (e) => dashboardConfig(e, this.outputDir, cwd) });
    let reply;
    try {
      reply = await client.request("run_watch", { run_id: this.runId }, {
        signal: o.signal as AbortSignal | undefined,
        onEvent: drawTrainEvents(display, cwd),
      });
    } catch (error) {
      display?.fail(errorInfo(error));
      throw error;
    }
    const run = new TrainingRun(reply.run, this.#host);
    if (run.state === "completed" || run.state === "cancelled") {
      display?.finish({
        status: run.state,
        step: run.step,
        totalSteps: run.totalSteps ?? run.step,
        output: shortPath(run.outputDir, cwd),
        elapsedS: (Date.now() - run.started.getTime()) / 1000,
      });
    } else if (run.state === "failed") {
      display?.fail(errorInfo(new Error(run.error ?? "the run failed")));
    }
    return run;
  }

  /**
   * Stops the run, whichever kernel started it: it writes a checkpoint at the next step and ends
   * "cancelled". Resolves false if the run had already ended.
   */
  async cancel(): Promise<boolean> {
    const client = await this.#host.connection();
    return (await client.request("cancel", { target: this.runId })).cancelled;
  }

  toString(): string {
    const of = this.totalSteps === undefined ? "" : `/${this.totalSteps}`;
    const from = this.state === "interrupted" && this.checkpoint !== undefined ? `, checkpoint ${this.checkpoint}` : "";
    return `TrainingRun(${this.runId.slice(0, 8)}, ${this.state}, step ${this.step}${of}, ${this.outputDir}${from})`;
  }
}

Object.defineProperty(TrainingRun.prototype, inspect.custom, {
  value(this: TrainingRun): string {
    return this.toString();
  },
});

/**
 * The runs in the on-disk index of `runtimeDir`, for when no worker is running: runs its worker left
 * running are listed as interrupted. `resume()` and `watch()` start a worker.
 */
export function listRunsOnDisk(host: RunHost, runtimeDir: string): TrainingRun[] {
  return readRunIndex(runtimeDir).map((info) => new TrainingRun(info, host));
}

/** The worker's training runs, running and finished, oldest first. */
export async function listRuns(host: RunHost): Promise<TrainingRun[]> {
  const client = await host.connection();
  const reply = await client.request("runs", {});
  return reply.runs.map((info) => new TrainingRun(info, host));
}
