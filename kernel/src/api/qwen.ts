import { randomUUID } from "node:crypto";
import { basename, dirname, isAbsolute } from "node:path";
import { inspect } from "node:util";
import { WorkerClient, type ClientOptions } from "../bridge/client";
import type { LoadRequest, ModelInfo as WireModelInfo } from "../bridge/protocol.gen";
import { endpoint, runtimeFilePath } from "../bridge/runtime";
import { ensureWorker, liveRuntime } from "../bridge/spawn";
import { stopWorker } from "../bridge/stop";
import { debugErrors, setDebugErrors } from "../display/error-info";
import { currentSink, type DisplaySink } from "../display/sink";
import { Adapters } from "./qwen-adapters";
import { datasets } from "./datasets";
import { listRuns, listRunsOnDisk, type RunHost, type TrainingRun } from "./runs";
import { checkDevices } from "./devices";
import { chooseDefaultModel } from "./default-model";
import { GpuGauge, type GpuOptions } from "./gpu";
import { cancelOnInterrupt } from "./interrupt";
import { formatCount, Model, type ModelHost } from "./model";
import { resolveModelSource } from "./model-source";
import { quantOptions } from "./export";
import { createLoadReporter } from "./progress";
import { lastReply, type Reply } from "./reply";
import { quantSummary, toQuantInfo } from "./report";
import { DTYPES, type LoadOptions, type WorkerStatus } from "./types";
import { expectBoolean, expectKnownKeys, expectOneOf, expectString } from "./validate";
import { toWorkerStatus } from "./worker-status";

export interface QwenOptions {
  /** Runtime file of the worker to use; default: $QWENBOOK_RUNTIME_DIR, Jupyter's runtime dir. */
  runtimeFile?: string;
  /** Python for a worker this client starts; default: $QWENBOOK_PYTHON, the checkout's .venv, python3. */
  python?: string;
  /** --device for a worker this client starts. */
  device?: string;
  /** How long a new worker may take to come up. */
  startTimeoutMs?: number;
  /** Where progress and streamed replies go; default: the kernel's output, else stdout. */
  sink?: DisplaySink;
  /** Sees every message the worker sends this client (type, parent request and session); for tracing. */
  onMessage?: ClientOptions["onMessage"];
}

const LOAD_OPTION_KEYS = ["dtype", "device", "devices", "revision", "attention", "localFilesOnly", "quiet", "quant", "groupSize", "calibration"] as const;

/**
 * Entry point of the API: finds (or starts) the worker, loads models, reports status. The
 * connection is made on first use and remade if the worker went away.
 */
export class Qwen {
  readonly #options: QwenOptions;
  #client: WorkerClient | null = null;
  #connecting: Promise<WorkerClient> | null = null;
  /** One session for every connection this object makes: the worker counts it as one user of the models it loads. */
  readonly #session = randomUUID();
  readonly #host: ModelHost;

  /** Built-in training data: `qwen.datasets.selfCognition({ name, author })`. */
  readonly datasets = datasets;

  /**
   * LoRA adapters on loaded models: `await qwen.adapters.load("runs/huanhuan")` puts an adapter on
   * the model it was trained on and returns the view that chats with it.
   */
  readonly adapters: Adapters = new Adapters({
    connection: () => this.#connection(),
    model: (info, client) => new Model(this.#host, info, { model: info.path, dtype: wireDtype(info.dtype), device: info.device }, client.info.pid),
  });

  constructor(options: QwenOptions = {}) {
    this.#options = { ...options };
    this.#host = {
      connection: () => this.#connection(),
      loadOn: (client, request, quiet) => this.#loadOn(client, request, quiet),
      sink: () => this.#sink(),
    };
  }

  /** The runtime file this client reads (resolved now, so env changes take effect). */
  get runtimeFile(): string {
    return this.#options.runtimeFile ?? runtimeFilePath();
  }

  /**
   * Loads a model into the worker (a hub id or a local folder) and returns it; a model that is
   * already loaded returns at once. Starts the worker if none is running.
   */
  async load(model: string, options: LoadOptions = {}): Promise<Model> {
    const o = expectKnownKeys("load(model, options)", options, LOAD_OPTION_KEYS);
    const request: LoadRequest = { model: resolveModelSource(model) };
    if (o.dtype !== undefined) request.dtype = expectOneOf("load option dtype", o.dtype, DTYPES);
    if (o.device !== undefined) request.device = checkDevice(o.device);
    if (o.devices !== undefined) request.devices = checkDevices(o.devices);
    if (o.revision !== undefined) request.revision = expectString("load option revision", o.revision, { nonEmpty: true });
    if (o.attention !== undefined) request.attn_implementation = expectOneOf("load option attention", o.attention, ["sdpa", "eager"] as const);
    if (o.localFilesOnly !== undefined) request.local_files_only = expectBoolean("load option localFilesOnly", o.localFilesOnly);
    const quant = quantOptions("load", o, ["int8", "int4", "nf4"]);
    if (quant) request.quant = quant;
    const quiet = o.quiet === undefined ? false : expectBoolean("load option quiet", o.quiet);
    const client = await this.#connection();
    const info = await this.#loadOn(client, request, quiet);
    return new Model(this.#host, info, request, client.info.pid);
  }

  /**
   * The model a notebook should use for `id`: $QWENBOOK_MODEL if set, else a locally cached copy
   * of `id`, else the tiny demo model, with a notice saying so.
   */
  defaultModel(id: string): string {
    const choice = chooseDefaultModel(id);
    if (choice.notice) this.#sink().text(`${choice.notice}\n`);
    return choice.model;
  }

  /**
   * The worker's training runs, running and finished (also those a previous kernel or a crashed
   * worker started); `await runs[i].watch()` re-opens a run's dashboard and `await runs[i].resume()`
   * continues an interrupted one. Does not start a worker: with none running, the runs come from
   * the worker's on-disk run index.
   */
  async runs(): Promise<TrainingRun[]> {
    const host: RunHost = {
      connection: () => this.#connection(),
      sink: () => this.#sink(),
      load: async (request) => {
        const client = await this.#connection();
        return new Model(this.#host, await this.#loadOn(client, request, true), request, client.info.pid);
      },
    };
    if (!(this.#client && !this.#client.closed) && !liveRuntime(this.runtimeFile)) return listRunsOnDisk(host, dirname(this.runtimeFile));
    return listRuns(host);
  }

  /** The running worker's models, requests in flight, memory and paged engines' caches. Does not start a worker. */
  async status(): Promise<WorkerStatus> {
    const client = await this.#connection({ start: false });
    return toWorkerStatus(await client.request("status", {}), { log: client.info.log, runtimeFile: this.runtimeFile });
  }

  /**
   * Shows a live gauge of the worker's memory (per GPU, or process RAM on a CPU-only worker). It
   * updates while the cell runs; `qwen.gpu().watch(seconds)` keeps it updating longer, and
   * awaiting the gauge waits until it stops. Starts the worker if none is running.
   */
  gpu(options: GpuOptions = {}): GpuGauge {
    return new GpuGauge({ connection: () => this.#connection(), sink: () => this.#sink() }, options);
  }

  /** Stops the worker (unloading every model, for every notebook using it). False if none ran. */
  async shutdown(): Promise<boolean> {
    const client = this.#client && !this.#client.closed ? this.#client : null;
    const info = client?.info ?? liveRuntime(this.runtimeFile);
    this.#client = null;
    if (!info) return false;
    await stopWorker(info, this.runtimeFile, client ?? undefined);
    return true;
  }

  /**
   * Closes this client's connection; the worker and its models stay. Not needed for a script to
   * exit, but frees the sockets at once.
   */
  disconnect(): void {
    this.#client?.close("qwen.disconnect() was called");
    this.#client = null;
  }

  /**
   * The reply the worker sent last (in this kernel), also when it was cancelled: after an
   * interrupt, `const story = await m.chat(...)` is never assigned, and the kept text is here.
   */
  lastReply(): Reply | undefined {
    return lastReply();
  }

  /**
   * Full error output: with `qwen.debug(true)` a failed cell prints the JS stack and the Python
   * traceback instead of one line (both are always on the error: `.stack`, `.traceback`).
   * Without an argument it only reports the setting. Applies to the whole kernel.
   */
  debug(on?: boolean): boolean {
    if (on !== undefined) setDebugErrors(expectBoolean("debug(on)", on));
    return debugErrors();
  }

  toString(): string {
    const c = this.#client;
    return c && !c.closed ? `Qwen(worker pid ${c.info.pid}, ${endpoint(c.info, "router")})` : "Qwen(not connected)";
  }

  #sink(): DisplaySink {
    return this.#options.sink ?? currentSink();
  }

  async #connection({ start = true } = {}): Promise<WorkerClient> {
    if (this.#client && !this.#client.closed) return this.#client;
    this.#connecting ??= (async () => {
      const runtimeFile = this.runtimeFile;
      let info = liveRuntime(runtimeFile);
      if (!info) {
        if (!start) throw new Error(`No qwenbook worker is running (no live worker in ${runtimeFile}); qwen.load() starts one`);
        info = await ensureWorker({
          runtimeFile,
          python: this.#options.python,
          device: this.#options.device,
          timeoutMs: this.#options.startTimeoutMs,
        });
      }
      const client = await WorkerClient.connect(info, { session: this.#session, onMessage: this.#options.onMessage });
      cancelOnInterrupt(client);
      this.#client = client;
      return client;
    })().finally(() => (this.#connecting = null));
    return this.#connecting;
  }

  async #loadOn(client: WorkerClient, request: LoadRequest, quiet: boolean): Promise<WireModelInfo> {
    const base = this.#sink();
    const label = isAbsolute(request.model) ? basename(request.model) : request.model;
    const report = quiet ? undefined : createLoadReporter(label, base.pin?.() ?? base);
    let reply;
    try {
      reply = await client.request("load", request, { onEvent: (event) => report?.progress(event.content) });
    } catch (error) {
      report?.failed();
      throw error;
    }
    if (report) {
      const m = reply.model;
      const what = `${m.model_id} (${m.architecture}, ${formatCount(m.parameters)} parameters, ${m.dtype} on ${(m.devices ?? [m.device]).join(" + ")})`;
      const seconds = m.load_seconds === undefined ? "" : ` in ${m.load_seconds.toFixed(1)} s`;
      const lines = [reply.already_loaded ? `${what} is already loaded` : `loaded ${what}${seconds}`];
      if (m.quant) lines.push(`  ${quantSummary(toQuantInfo(m.quant))}`);
      report.done(lines.join("\n"));
    }
    return reply.model;
  }
}

Object.defineProperty(Qwen.prototype, inspect.custom, {
  value(this: Qwen): string {
    return this.toString();
  },
});

function wireDtype(dtype: string): LoadRequest["dtype"] {
  return (DTYPES as readonly string[]).includes(dtype) ? (dtype as LoadRequest["dtype"]) : "auto";
}

function checkDevice(value: unknown): string {
  const d = expectString("load option device", value, { nonEmpty: true });
  if (!/^(auto|cpu|cuda|cuda:\d+)$/.test(d)) {
    throw new RangeError(`load option device must be "auto", "cpu", "cuda" or "cuda:N", got ${JSON.stringify(d)}`);
  }
  return d;
}

/** The shared client a notebook uses: `import { qwen } from "qwenbook"`. */
export const qwen = new Qwen();
