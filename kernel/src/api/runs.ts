// Training runs as the worker keeps them, for a kernel that restarted while a run went on:
// `await qwen.runs()` lists them and `run.watch()` redraws the dashboard from the run's history,
// then follows it live until it ends.
import { inspect } from "node:util";
import type { WorkerClient } from "../bridge/client";
import type { RunInfo } from "../bridge/protocol.gen";
import { errorInfo } from "../display/error-info";
import type { DisplaySink } from "../display/sink";
import { createTrainDisplay } from "../display/train-display";
import { dashboardConfig, shortPath } from "./train-config";
import { expectBoolean, expectKnownKeys } from "./validate";

export type RunState = RunInfo["state"];

export interface RunHost {
  connection(): Promise<WorkerClient>;
  sink(): DisplaySink;
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
    this.#host = host;
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
        onEvent: (event) => {
          switch (event.type) {
            case "train_begin":
              return display?.begin(event.content);
            case "train_progress":
              return display?.progress(event.content);
            case "eval":
              return display?.evaluate(event.content);
            case "checkpoint":
              return display?.checkpoint({ ...event.content, path: shortPath(event.content.path, cwd) });
          }
        },
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
    return `TrainingRun(${this.runId.slice(0, 8)}, ${this.state}, step ${this.step}${of}, ${this.outputDir})`;
  }
}

Object.defineProperty(TrainingRun.prototype, inspect.custom, {
  value(this: TrainingRun): string {
    return this.toString();
  },
});

/** The worker's training runs, running and finished, oldest first. */
export async function listRuns(host: RunHost): Promise<TrainingRun[]> {
  const client = await host.connection();
  const reply = await client.request("runs", {});
  return reply.runs.map((info) => new TrainingRun(info, host));
}
