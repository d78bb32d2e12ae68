// Builders for the three rich outputs the JupyterLab extension renders. The bundle shapes and MIME
// types live in one place, python-bridge/qwenbook_bridge/schema/bundles.json, from which both sides
// generate their types (here bundles.gen.ts). Nothing here does I/O: callers pass the result to a
// DisplaySink, usually through a throttle.
import type { DeviceMemory, EngineCache } from "../bridge/protocol.gen";
import {
  BUNDLE_VERSION,
  CHAT_MIME,
  GPU_MIME,
  TRAIN_MIME,
  type BundleMime,
  type BundleMimeTypes,
  type ChatBundle,
  type DeviceGauge,
  type ErrorInfo,
  type GpuBundle,
  type TrainBundle,
} from "./bundles.gen";
import { chatHtml, chatText, gpuHtml, gpuText, trainHtml, trainText } from "./fallbacks";

export type { BundleMime, ChatBundle, DeviceGauge, ErrorInfo, GpuBundle, TrainBundle };
export { CHAT_MIME, GPU_MIME, TRAIN_MIME };
const VERSION = BUNDLE_VERSION satisfies BundleMimeTypes[BundleMime]["version"];

/**
 * A display_data payload: the custom type for JupyterLab plus text/plain and text/html so classic
 * Notebook, VS Code, nbconvert and GitHub still show the gist.
 */
export interface RichBundle<M extends BundleMime> {
  data: { readonly [K in M]: BundleMimeTypes[K] } & { readonly "text/plain": string; readonly "text/html": string };
  metadata: Readonly<Record<string, unknown>>;
}

/** A bundle's content without its version, which the builders set. */
export type ChatView = Omit<ChatBundle, "version">;
export type TrainView = Omit<TrainBundle, "version">;
export type GpuView = Omit<GpuBundle, "version">;

export function chatBundle(view: ChatView): RichBundle<typeof CHAT_MIME> {
  const bundle: ChatBundle = { version: VERSION, ...view };
  return { data: { [CHAT_MIME]: bundle, "text/plain": chatText(bundle), "text/html": chatHtml(bundle) }, metadata: {} };
}

export function trainBundle(view: TrainView): RichBundle<typeof TRAIN_MIME> {
  const bundle: TrainBundle = { version: VERSION, ...view };
  return { data: { [TRAIN_MIME]: bundle, "text/plain": trainText(bundle), "text/html": trainHtml(bundle) }, metadata: {} };
}

export function gpuBundle(view: GpuView): RichBundle<typeof GPU_MIME> {
  const bundle: GpuBundle = { version: VERSION, ...view };
  return { data: { [GPU_MIME]: bundle, "text/plain": gpuText(bundle), "text/html": gpuHtml(bundle) }, metadata: {} };
}

/** One logged training step, as a `train_progress` event reports it. */
export interface TrainStepPoint {
  step: number;
  loss: number;
  lr?: number;
  epoch?: number;
  tokensPerSecond?: number;
  elapsedS?: number;
  etaS?: number;
  /** A preference run's metrics at this step, under TRL's names ("rewards/margins", ...). */
  metrics?: Readonly<Record<string, number>>;
}

export type ConfigValue = string | number | boolean | null;

export interface TrainRecorderOptions {
  title?: string;
  totalSteps: number;
  totalEpochs?: number;
  /** The epochs the options named, when maxSteps set the run's length instead; shown beside the epoch readout. */
  epochsOption?: number;
  /** The run's options in display order; shown in the dashboard's config table. */
  config?: Readonly<Record<string, ConfigValue>>;
  /**
   * Most points kept per series. Past it, every other point is dropped and later steps are kept at
   * the coarser stride, so a saved notebook stays small however long the run.
   */
  maxPoints?: number;
}

const DEFAULT_MAX_POINTS = 2000;

/** Collects a run's events into the training dashboard's bundle. */
export class TrainRecorder {
  #state: TrainBundle["state"] = "running";
  #progress: TrainBundle["progress"];
  readonly #steps: number[] = [];
  readonly #losses: Array<number | null> = [];
  readonly #lrs: number[] = [];
  /** Preference metrics by name, each parallel to #steps (null where a step did not report it). */
  readonly #metrics = new Map<string, Array<number | null>>();
  readonly #evalSteps: number[] = [];
  readonly #evalLosses: Array<number | null> = [];
  readonly #options: TrainRecorderOptions;
  readonly #maxPoints: number;
  #stride = 1;
  #logged = 0;
  #latest: TrainStepPoint | undefined;
  #latestKept = false;
  #lastLr: number | undefined;
  #checkpoint: string | undefined;
  #error: ErrorInfo | undefined;

  constructor(options: TrainRecorderOptions) {
    this.#options = options;
    this.#maxPoints = Math.max(2, Math.floor(options.maxPoints ?? DEFAULT_MAX_POINTS));
    this.#progress = { step: 0, totalSteps: options.totalSteps, totalEpochs: options.totalEpochs, epochsOption: options.epochsOption };
  }

  /** Records a logged step and the progress it reports. */
  step(p: TrainStepPoint): this {
    this.#progress = {
      ...this.#progress,
      step: p.step,
      epoch: p.epoch === undefined ? this.#progress.epoch : round(p.epoch, 3),
      tokensPerSecond: p.tokensPerSecond === undefined ? this.#progress.tokensPerSecond : round(p.tokensPerSecond, 1),
      elapsedS: p.elapsedS === undefined ? this.#progress.elapsedS : round(p.elapsedS, 1),
      etaS: p.etaS === undefined ? this.#progress.etaS : round(p.etaS, 1),
    };
    if (p.lr !== undefined) this.#lastLr = significant(p.lr, 3);
    this.#latest = p;
    this.#latestKept = this.#logged % this.#stride === 0;
    this.#logged += 1;
    if (this.#latestKept) {
      this.#steps.push(p.step);
      this.#losses.push(lossValue(p.loss));
      this.#lrs.push(this.#lastLr ?? 0);
      this.#pushMetrics(p.metrics, this.#steps.length - 1);
      if (this.#steps.length > this.#maxPoints) this.#halve();
    }
    return this;
  }

  /** Records an evaluation's loss at `step`. */
  evaluate(step: number, loss: number): this {
    this.#evalSteps.push(step);
    this.#evalLosses.push(lossValue(loss));
    return this;
  }

  /** Remembers the newest checkpoint folder, shown when the run ends. */
  checkpoint(path: string): this {
    this.#checkpoint = path;
    return this;
  }

  /** Ends the run; `failed` takes the error to show. */
  finish(state: "done" | "cancelled"): this;
  finish(state: "failed", error: ErrorInfo): this;
  finish(state: "done" | "cancelled" | "failed", error?: ErrorInfo): this {
    this.#state = state;
    this.#error = error;
    if (state === "done") this.#progress = { ...this.#progress, etaS: undefined };
    return this;
  }

  /** The run so far as a bundle's content. */
  view(): TrainView {
    const steps = [...this.#steps];
    const losses = [...this.#losses];
    const lrs = [...this.#lrs];
    const metrics = new Map([...this.#metrics].map(([k, v]) => [k, [...v]]));
    const latest = this.#latest;
    if (latest && !this.#latestKept) {
      // The newest step always shows, even between kept strides.
      steps.push(latest.step);
      losses.push(lossValue(latest.loss));
      lrs.push(this.#lastLr ?? 0);
      for (const [name, series] of metrics) series.push(metricValue(latest.metrics?.[name]));
    }
    const train: TrainView["train"] = this.#lastLr === undefined ? { step: steps, loss: losses } : { step: steps, loss: losses, lr: lrs };
    if (metrics.size > 0) train.metrics = Object.fromEntries(metrics);
    return definedOnly({
      state: this.#state,
      title: this.#options.title,
      progress: definedOnly(this.#progress),
      // A run that never logs a learning rate sends no lr series rather than a line of zeros.
      train,
      eval: this.#evalSteps.length > 0 ? { step: [...this.#evalSteps], loss: [...this.#evalLosses] } : undefined,
      config: this.#options.config ? { ...this.#options.config } : undefined,
      checkpoint: this.#checkpoint,
      error: this.#error,
    });
  }

  bundle(): RichBundle<typeof TRAIN_MIME> {
    return trainBundle(this.view());
  }

  #pushMetrics(values: Readonly<Record<string, number>> | undefined, index: number): void {
    for (const name of Object.keys(values ?? {})) {
      // A metric first seen now has no value at the earlier kept steps.
      if (!this.#metrics.has(name)) this.#metrics.set(name, Array<number | null>(index).fill(null));
    }
    for (const [name, series] of this.#metrics) series.push(metricValue(values?.[name]));
  }

  #halve(): void {
    for (const series of [this.#steps, this.#losses, this.#lrs, ...this.#metrics.values()] as unknown[][]) {
      const kept = series.filter((_, i) => i % 2 === 0);
      series.length = 0;
      series.push(...kept);
    }
    this.#stride *= 2;
  }
}

/** A device's memory as the worker's `gpu` telemetry reports it. */
export type DeviceSample = DeviceMemory;

export interface GpuHistoryOptions {
  /** How many recent samples the sparkline shows. */
  samples?: number;
  /** Seconds between samples, for the sparkline's caption. */
  intervalS?: number;
}

/** Keeps recent `gpu` telemetry per device for the gauge's sparklines, and the newest engines' caches. */
export class GpuHistory {
  readonly #samples: number;
  readonly #intervalS: number;
  #devices: DeviceSample[] = [];
  #engines: EngineCache[] = [];
  #time: number | undefined;
  readonly #history = new Map<string, number[]>();

  constructor(options: GpuHistoryOptions = {}) {
    this.#samples = Math.max(2, Math.floor(options.samples ?? 60));
    this.#intervalS = options.intervalS ?? 1;
  }

  push(event: { devices: readonly DeviceSample[]; engines?: readonly EngineCache[]; time?: number }): this {
    this.#devices = event.devices.map((d) => ({ ...d }));
    this.#engines = (event.engines ?? []).map((e) => ({ ...e }));
    this.#time = event.time;
    for (const d of event.devices) {
      const h = this.#history.get(d.device) ?? [];
      h.push(d.used);
      if (h.length > this.#samples) h.splice(0, h.length - this.#samples);
      this.#history.set(d.device, h);
    }
    return this;
  }

  /** The newest sample with each device's history; `live` says whether more updates will come. */
  view(live: boolean): GpuView {
    const devices: DeviceGauge[] = this.#devices.map((d) =>
      definedOnly({ ...d, history: [...(this.#history.get(d.device) ?? [])] }),
    );
    // No engines, no field: a gauge without them saves as it did before engines were reported.
    const engines = this.#engines.length > 0 ? this.#engines.map((e) => ({ ...e })) : undefined;
    return definedOnly({ devices, engines, time: this.#time, intervalS: this.#intervalS, live });
  }

  bundle(live: boolean): RichBundle<typeof GPU_MIME> {
    return gpuBundle(this.view(live));
  }
}

/** JSON has no NaN or Infinity; a diverged loss becomes a gap in the chart. */
function lossValue(loss: number): number | null {
  return Number.isFinite(loss) ? significant(loss, 5) : null;
}

function significant(x: number, digits: number): number {
  return Number.isFinite(x) ? Number(x.toPrecision(digits)) : x;
}

function round(x: number, decimals: number): number {
  const f = 10 ** decimals;
  return Math.round(x * f) / f;
}

/** Drops undefined fields so saved notebooks do not carry them and JSON round trips are exact. */
function definedOnly<T extends object>(obj: T): T {
  return Object.fromEntries(Object.entries(obj).filter(([, v]) => v !== undefined)) as T;
}

function metricValue(x: number | undefined): number | null {
  return x === undefined || !Number.isFinite(x) ? null : significant(x, 5);
}
