import { randomUUID } from "node:crypto";
import { inspect } from "node:util";
import type { WorkerClient } from "../bridge/client";
import type { DeviceMemory, EngineCache, RankMemory } from "../bridge/protocol.gen";
import { GpuHistory } from "../display/bundles";
import { markShown } from "../display/shown";
import type { DisplaySink } from "../display/sink";
import { createThrottle } from "../display/throttle";
import { expectKnownKeys, expectNumber } from "./validate";

/** What a gauge needs from the `qwen` object that made it. */
export interface GpuHost {
  /** The live connection, starting a worker if none runs. */
  connection(): Promise<WorkerClient>;
  sink(): DisplaySink;
}

export interface GpuOptions {
  /** Keep the gauge updating for at least this many seconds; the same as `.watch(seconds)`. */
  watch?: number;
}

/** Seconds between samples: the worker broadcasts memory once a second while it works. */
const INTERVAL_S = 1;
const SAMPLES = 60;
/** A day: long enough for any watch, short enough for setTimeout. */
const MAX_WATCH_S = 86_400;

/**
 * A live memory gauge of the worker's devices (GPU memory, or process RAM on a CPU-only worker), with
 * the key/value cache of each paged engine (chat, server) under the device it lives on.
 * It is drawn as soon as `qwen.gpu()` is called, fed by the worker's `gpu` broadcasts, and keeps
 * updating while the cell that made it runs (in a script: while this client has requests in
 * flight), or longer with `.watch(seconds)`. Awaiting it waits until it stops updating.
 */
export class GpuGauge implements PromiseLike<void> {
  readonly #sink: DisplaySink;
  readonly #id = randomUUID();
  readonly #done: Promise<void>;
  /** Stay live until at least this time (ms since the epoch). */
  #until: number;
  #stopped = false;
  #awaited = false;
  /** Whether the output exists yet, and whether it shows a sample. */
  #shown = false;
  #sampled = false;
  #wake: () => void = () => undefined;
  /** The ranks of a several-process training run, shown after the worker's own devices. */
  #ranks: DeviceMemory[] = [];
  #redraw: () => void = () => undefined;

  constructor(host: GpuHost, options: GpuOptions = {}) {
    const o = expectKnownKeys("gpu(options)", options, ["watch"]);
    this.#until = Date.now() + (o.watch === undefined ? 0 : watchSeconds("gpu option watch", o.watch) * 1000);
    const sink = host.sink();
    // Updates arriving after the cell ended still belong to the output this cell made.
    this.#sink = sink.pin?.() ?? sink;
    if (this.#sink.rich) {
      // Takes the gauge's place in the cell now, above whatever the cell shows next.
      this.#sink.display({ data: { "text/plain": "GPU memory: asking the worker…" } }, { id: this.#id });
      this.#shown = true;
      // The gauge is its own output: `qwen.gpu();` as a cell's last line must not print GpuGauge(…) under it.
      markShown(this);
    }
    this.#done = this.#run(host);
    this.#done.catch((error: unknown) => {
      const message = error instanceof Error ? error.message : String(error);
      if (this.#shown && !this.#sampled) {
        this.#sink.display({ data: { "text/plain": `GPU memory: the gauge could not start: ${message}` } }, { id: this.#id, update: true });
      } else if (!this.#awaited) {
        // Nobody awaits a gauge left as a cell's last expression; say why it stopped instead.
        this.#sink.text(`qwenbook: the memory gauge stopped: ${message}\n`);
      }
    });
  }

  /** Keeps the gauge updating for `seconds` from now, even when nothing else runs. */
  watch(seconds: number): this {
    const s = watchSeconds("watch(seconds)", seconds);
    if (this.#stopped) {
      throw new Error("This gauge has stopped updating; start a new one with qwen.gpu().watch(seconds)");
    }
    this.#until = Math.max(this.#until, Date.now() + s * 1000);
    this.#wake();
    return this;
  }

  /**
   * Shows a several-rank run's memory, one bar per rank (its process's tensors on its GPU), beside the
   * worker's own devices; called with each progress event that carries it.
   */
  showRanks(ranks: readonly RankMemory[]): void {
    this.#ranks = ranks.map((r) => ({
      device: `rank ${r.rank} · ${r.device}`,
      kind: r.device.startsWith("cuda") ? "cuda" : "cpu",
      name: r.name,
      used: r.used,
      peak: r.peak,
      total: r.total,
    }));
    this.#redraw();
  }

  /** Stops updating now; the output keeps the last sample. */
  stop(): void {
    this.#until = 0;
    this.#stopped = true;
    this.#wake();
  }

  /** False once the gauge has drawn its last sample. */
  get live(): boolean {
    return !this.#stopped;
  }

  then<A = void, B = never>(
    onFulfilled?: ((value: void) => A | PromiseLike<A>) | null,
    onRejected?: ((reason: unknown) => B | PromiseLike<B>) | null,
  ): Promise<A | B> {
    this.#awaited = true;
    return this.#done.then(onFulfilled, onRejected);
  }

  toString(): string {
    if (this.#stopped) return "GpuGauge(stopped)";
    const left = Math.ceil((this.#until - Date.now()) / 1000);
    return left > 0 ? `GpuGauge(live, watching ${left} s)` : "GpuGauge(live while this cell runs)";
  }

  async #run(host: GpuHost): Promise<void> {
    let client: WorkerClient;
    try {
      client = await host.connection();
    } catch (error) {
      this.#stopped = true;
      throw error;
    }
    const history = new GpuHistory({ samples: SAMPLES, intervalS: INTERVAL_S });
    let lastSampleAt = 0;
    const draw = createThrottle((live: boolean) => {
      this.#sink.display(history.bundle(live), { id: this.#id, update: this.#shown });
      this.#shown = true;
    });
    let workerDevices: readonly DeviceMemory[] = [];
    let workerEngines: readonly EngineCache[] | undefined;
    let sampleTime = 0;
    const sample = (devices: readonly DeviceMemory[], engines: readonly EngineCache[] | undefined, time: number) => {
      workerDevices = devices;
      workerEngines = engines;
      sampleTime = time;
      history.push({ devices: [...devices, ...this.#ranks], engines, time });
      lastSampleAt = Date.now();
      this.#sampled = true;
      if (!this.#stopped) draw.push(true);
    };
    this.#redraw = () => {
      if (!this.#sampled || this.#stopped) return;
      history.push({ devices: [...workerDevices, ...this.#ranks], engines: workerEngines, time: sampleTime });
      draw.push(true);
    };
    let workerStopping = false;
    // The worker broadcasts its memory once a second only while it works; idle, it is polled.
    let workerBusy = false;
    const cellDone = this.#cellDone();
    const unsubscribe = [
      client.subscribe("gpu", (event) => sample(event.devices, event.engines, event.time)),
      client.subscribe("worker_status", (event) => {
        workerBusy = event.state === "busy";
        workerStopping = event.state === "stopping";
        if (workerStopping) this.#wake();
      }),
    ];
    try {
      const snapshot = async () => {
        const status = await client.request("status", {});
        workerBusy = status.running.length > 0;
        sample(status.memory, status.engines, Date.now() / 1000);
      };
      // Numbers at once, without waiting for the next broadcast.
      await snapshot();
      const intervalMs = INTERVAL_S * 1000;
      // A cell that awaits the gauge runs as long as the gauge does, so then only requests count.
      const working = () => (cellDone && !this.#awaited ? !cellDone.settled : client.inFlight().length > 0);
      while (!this.#stopped && (Date.now() < this.#until || working())) {
        await new Promise<void>((resolve) => {
          const left = this.#until - Date.now();
          const timer = setTimeout(resolve, left > 0 ? Math.min(intervalMs, left) : intervalMs);
          this.#wake = () => {
            clearTimeout(timer);
            resolve();
          };
        });
        this.#wake = () => undefined;
        if (this.#stopped || workerStopping || client.closed) break;
        // A busy worker's broadcast may have been missed (a subscription takes a moment to start).
        if (Date.now() - lastSampleAt >= (workerBusy ? 2 : 0.9) * intervalMs) await snapshot();
      }
      // The last drawing shows the memory as the work left it (a short request can end between samples),
      // unless the gauge was stopped by hand or the worker is going away.
      if (!this.#stopped && !workerStopping && !client.closed && Date.now() - lastSampleAt > 100) await snapshot();
    } finally {
      this.#stopped = true;
      for (const off of unsubscribe) off();
      if (this.#sampled) draw.finish(false);
      else draw.cancel();
    }
  }

  /** The running cell's end, watched so the gauge stops with it; undefined outside a kernel. */
  #cellDone(): { settled: boolean } | undefined {
    const done = this.#sink.whenCellDone?.();
    if (!done) return undefined;
    const state = { settled: false };
    void done.then(() => {
      state.settled = true;
      this.#wake();
    });
    return state;
  }
}

Object.defineProperty(GpuGauge.prototype, inspect.custom, {
  value(this: GpuGauge): string {
    return this.toString();
  },
});

function watchSeconds(what: string, value: unknown): number {
  return expectNumber(what, value, { above: 0, max: MAX_WATCH_S });
}
