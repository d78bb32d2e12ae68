import { randomUUID } from "node:crypto";
import { inspect } from "node:util";
import type { WorkerClient } from "../bridge/client";
import type { ServeStartRequest, ServerInfo, ServeStats as WireStats } from "../bridge/protocol.gen";
import { escapeHtml } from "../display/fallbacks";
import { markShown } from "../display/shown";
import type { DisplaySink } from "../display/sink";
import { createThrottle, type Throttle } from "../display/throttle";
import { checkAdapters } from "./export";
import { expectInteger, expectKnownKeys, expectNumber, expectString } from "./validate";

export interface ServeOptions {
  /** Port to listen on (default 8000); 0 picks a free one, which `server.port` then tells. */
  port?: number;
  /** Address to bind: "127.0.0.1" (default) is this machine only, "0.0.0.0" every interface. */
  host?: string;
  /** Require `Authorization: Bearer <apiKey>` on every request (the OpenAI client's apiKey). */
  apiKey?: string;
  /** The id clients pass as `model`; default: the model's hub id or folder name. */
  name?: string;
  /** Requests decoded together in one batch (default 32); more wait in a queue. */
  maxBatchSize?: number;
  /**
   * Requests that may wait for a place in the batch (default 4 per batch row, 128 for 32); one more is
   * answered 429 with a Retry-After header. 0 accepts only what fits in the batch at once.
   */
  maxQueue?: number;
  /** Largest request body in bytes (default 4 MiB, 4194304); larger ones are answered 413 while they arrive. */
  maxBody?: number;
  /** Retry-After of a 429, in seconds (default: estimated from how long recent requests took). */
  retryAfter?: number;
  /**
   * Seconds a client may take to send its headers or body, or leave a stream unread, before it is
   * disconnected and its generation cancelled (default 30).
   */
  clientTimeout?: number;
  /**
   * LoRA adapters served beside the model, by name: `{ huanhuan: "runs/huanhuan" }` makes a request whose
   * `model` is "huanhuan" answer through that adapter (as vLLM's --lora-modules); every other request
   * gets the model itself. Folders are resolved against the notebook's folder. Rows of different adapters
   * decode in the same batch.
   */
  adapters?: Record<string, string>;
  /**
   * Share of the device's memory the model and its key/value cache may use, in (0, 1] (default 0.9; vLLM's
   * gpu_memory_utilization). The cache gets what the weights leave of it.
   */
  memoryUtilization?: number;
}

/** The server engine's key/value cache (absent for an engine without a block cache). */
export interface ServerCache {
  blocksTotal: number;
  /** Blocks held by running requests. */
  blocksUsed: number;
  /** Tokens per block. */
  blockSize: number;
  /** Memory the cache takes, in bytes. */
  cacheBytes: number;
  /** Of the prompt tokens looked up in the prefix cache, the share found there (0 to 1). */
  prefixHitRate: number;
  /** Share of the device's memory the model and its cache may use. */
  memoryUtilization?: number;
}

/** Live counters of a server. */
export interface ServerStats {
  running: boolean;
  /** Base URL for OpenAI clients (`baseURL`), ending in /v1. */
  url: string;
  requestsTotal: number;
  /** Requests generating now. */
  requestsActive: number;
  /** Requests queued behind a full batch. */
  requestsWaiting: number;
  /** Requests turned away with 429 because the queue was full (also counted in `errors`). */
  requestsRejected: number;
  /** Requests answered with an error status (bad key, bad JSON, failed generation...). */
  errors: number;
  tokensGenerated: number;
  /** Averaged over the last few seconds. */
  tokensPerSecond: number;
  /** The latest error as "<HTTP status>: <message>". */
  lastError?: string;
  lastErrorAt?: Date;
  uptimeSeconds: number;
  /** Names of the LoRA adapters served beside the model (each a `model` clients may ask for). */
  adapters: string[];
  /** The engine's key/value cache. */
  cache?: ServerCache;
}

/** What a server needs from the model that started it. */
export interface ServeHost {
  /** The live connection (after a worker restart: to the new worker, where this server is gone). */
  connection(): Promise<WorkerClient>;
  sink(): DisplaySink;
}

/** How often a live output polls the worker for counters. */
const REFRESH_MS = 1000;
/** A day: long enough for any watch, short enough for setTimeout. */
const MAX_WATCH_S = 86_400;

/** Checks `m.serve()` options now, before anything is sent; the model id is filled in later. */
export function serveRequest(options: ServeOptions): Omit<ServeStartRequest, "model_id"> {
  const o = expectKnownKeys("serve(options)", options, [
    "port", "host", "apiKey", "name", "maxBatchSize", "maxQueue", "maxBody", "retryAfter", "clientTimeout", "adapters",
    "memoryUtilization",
  ]);
  const request: Omit<ServeStartRequest, "model_id"> = {
    port: o.port === undefined ? 8000 : expectInteger("serve option port", o.port, { min: 0, max: 65535, hint: "0 picks a free port" }),
  };
  if (o.host !== undefined) request.host = noSpaces("serve option host", o.host, '"127.0.0.1" (this machine only) or "0.0.0.0" (every interface)');
  if (o.apiKey !== undefined) request.api_key = noSpaces("serve option apiKey", o.apiKey, 'e.g. "sk-local"');
  if (o.name !== undefined) {
    const name = expectString("serve option name", o.name, { nonEmpty: true });
    if (name.trim() !== name || /[\r\n]/.test(name)) {
      throw new RangeError(`serve option name must not start or end with spaces or hold line breaks, got ${JSON.stringify(name)}`);
    }
    request.name = name;
  }
  if (o.maxBatchSize !== undefined) request.max_batch_size = expectInteger("serve option maxBatchSize", o.maxBatchSize, { min: 1, max: 1024 });
  if (o.maxQueue !== undefined) {
    request.max_queue = expectInteger("serve option maxQueue", o.maxQueue, { min: 0, max: 1_000_000, hint: "0 accepts only what fits in the batch" });
  }
  if (o.maxBody !== undefined) {
    request.max_body_bytes = expectInteger("serve option maxBody", o.maxBody, { min: 1024, max: 1024 ** 3, hint: "bytes, e.g. 8 * 1024 ** 2 for 8 MiB" });
  }
  if (o.retryAfter !== undefined) request.retry_after_s = expectInteger("serve option retryAfter", o.retryAfter, { min: 1, max: 3600, hint: "seconds" });
  if (o.clientTimeout !== undefined) {
    request.client_timeout_s = expectNumber("serve option clientTimeout", o.clientTimeout, { min: 0.1, max: 3600, hint: "seconds" });
  }
  if (o.adapters !== undefined) {
    const adapters = serveAdapters(o.adapters, request.name);
    if (Object.keys(adapters).length > 0) request.adapters = adapters;
  }
  if (o.memoryUtilization !== undefined) {
    request.memory_utilization = expectNumber("serve option memoryUtilization", o.memoryUtilization, {
      above: 0, max: 1, hint: "a fraction of the device's memory, e.g. 0.9",
    });
  }
  return request;
}

/** `adapters: { name: folder }` with each name checked and each folder an adapter folder, made absolute. */
function serveAdapters(value: unknown, baseName: string | undefined): Record<string, string> {
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new TypeError(
      `serve option adapters must map a name to an adapter folder, e.g. { huanhuan: "runs/huanhuan" }, got ${Array.isArray(value) ? "an array" : value === null ? "null" : typeof value}`,
    );
  }
  const out: Record<string, string> = {};
  for (const [name, folder] of Object.entries(value)) {
    if (name === "" || name.trim() !== name || /[\r\n]/.test(name)) {
      throw new RangeError(`serve option adapters: a name must be non-empty, without surrounding spaces or line breaks, got ${JSON.stringify(name)}`);
    }
    if (name === baseName) {
      throw new RangeError(`serve option adapters: ${JSON.stringify(name)} is already the model's name (option name); give the adapter another name`);
    }
    out[name] = checkAdapters(folder, `serve option adapters.${name}`)[0]!;
  }
  return out;
}

function noSpaces(name: string, value: unknown, example: string): string {
  const s = expectString(name, value, { nonEmpty: true });
  if (/\s/.test(s)) throw new RangeError(`${name} must not contain spaces, got ${JSON.stringify(s)} (${example})`);
  return s;
}

/** Sends serve_start on the model's worker and returns the running server, shown live in a notebook. */
export async function startServer(
  host: ServeHost,
  connect: () => Promise<{ client: WorkerClient; modelId: string }>,
  request: Omit<ServeStartRequest, "model_id">,
): Promise<Server> {
  const { client, modelId } = await connect();
  const reply = await client.request("serve_start", { ...request, model_id: modelId });
  return new Server(host, reply.server, client.info.pid, request.api_key, reply.already_running);
}

/**
 * An OpenAI-compatible HTTP server running in the worker on a loaded model (`await m.serve()`).
 * Point any OpenAI client at `server.url`. In a notebook it draws an output with live request
 * count, tokens/s and the last error, refreshed while the cell that started it runs, during
 * `server.watch(seconds)`, and on every `server.stats()`.
 */
export class Server {
  /** The worker's handle for this server. */
  readonly id: string;
  /** Base URL for OpenAI clients, e.g. http://127.0.0.1:8000/v1. */
  readonly url: string;
  /** The id clients pass as `model`. */
  readonly modelName: string;
  /** The loaded model it serves. */
  readonly modelId: string;
  readonly host: string;
  readonly port: number;
  /** A curl command that sends one chat request. */
  readonly curlExample: string;
  /** LoRA adapters served beside the model: name (a `model` clients may ask for) -> folder. */
  readonly adapters: Readonly<Record<string, string>>;
  readonly #host: ServeHost;
  readonly #apiKey: string | undefined;
  readonly #workerPid: number;
  readonly #sink: DisplaySink;
  readonly #displayId = randomUUID();
  readonly #draw: Throttle<ServerStats> | undefined;
  #last: ServerStats;
  #note = "";
  #cellRunning = false;
  #until = 0;
  #loop: Promise<void> | null = null;
  #wake: () => void = () => undefined;
  readonly #watchers = new Set<() => void>();

  constructor(host: ServeHost, info: ServerInfo, workerPid: number, apiKey: string | undefined, alreadyRunning = false) {
    this.#host = host;
    this.id = info.server_id;
    this.url = info.url;
    this.modelName = info.name;
    this.modelId = info.model_id;
    this.host = info.host;
    this.port = info.port;
    this.curlExample = info.curl_example;
    this.adapters = Object.freeze({ ...(info.adapters ?? {}) });
    this.#apiKey = apiKey;
    this.#workerPid = workerPid;
    this.#last = toStats(info.stats);
    const sink = host.sink();
    // Refreshes arriving after the cell ended still belong to the output this cell made.
    this.#sink = sink.pin?.() ?? sink;
    if (alreadyRunning) this.#note = "already running with these options";
    if (this.#sink.rich) {
      let shown = false;
      this.#draw = createThrottle(
        (s: ServerStats) => {
          this.#sink.display(serverBundle(this, s, this.#note), { id: this.#displayId, update: shown });
          shown = true;
        },
        { intervalMs: 250 },
      );
      this.#draw.push(this.#last);
      this.#watchCell();
    } else {
      const again = alreadyRunning ? " (already running)" : "";
      this.#sink.text(`serving ${this.modelId} as "${this.modelName}" at ${this.url}${again}\n`);
    }
  }

  /** True until stopped (as last seen: `stats()` asks the worker). */
  get running(): boolean {
    return this.#last.running;
  }

  /** The counters as last fetched, without asking the worker. */
  get lastStats(): ServerStats {
    return { ...this.#last };
  }

  /** Fetches the live counters (and refreshes the notebook output). */
  async stats(): Promise<ServerStats> {
    if (!this.#last.running) return this.lastStats;
    const client = await this.#host.connection();
    if (client.info.pid !== this.#workerPid) {
      return this.#ended(`the worker it ran in (pid ${this.#workerPid}) has stopped; call m.serve() again`);
    }
    const [info] = (await client.request("serve_status", { server_id: this.id })).servers;
    if (!info) return this.#ended("stopped elsewhere (serve_stop, the model was unloaded, or another notebook)");
    this.#update(toStats(info.stats));
    return this.lastStats;
  }

  /**
   * Keeps the output refreshing for `seconds` from now (once a second); resolves with the
   * counters when the time is up or the server stops.
   */
  watch(seconds: number): Promise<ServerStats> {
    const s = expectNumber("watch(seconds)", seconds, { above: 0, max: MAX_WATCH_S });
    if (!this.#last.running) return Promise.resolve(this.lastStats);
    const deadline = Date.now() + s * 1000;
    this.#until = Math.max(this.#until, deadline);
    this.#kick();
    return new Promise<ServerStats>((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.#watchers.delete(done);
        resolve(this.lastStats);
      };
      const timer = setTimeout(done, deadline - Date.now());
      this.#watchers.add(done);
    });
  }

  /** Stops the server and frees its port; the model stays loaded. Resolves with the final counters. */
  async stop(): Promise<ServerStats> {
    if (!this.#last.running) return this.lastStats;
    const client = await this.#host.connection();
    if (client.info.pid !== this.#workerPid) {
      return this.#ended(`the worker it ran in (pid ${this.#workerPid}) has stopped`);
    }
    const [info] = (await client.request("serve_stop", { server_id: this.id })).stopped;
    if (!info) return this.#shown(this.#ended("stopped elsewhere"));
    this.#note = "stopped";
    return this.#shown(this.#ended("", toStats(info.stats)));
  }

  /** The server's widget shows these final counters; the kernel need not print them again. */
  #shown(stats: ServerStats): ServerStats {
    return this.#draw ? markShown(stats) : stats;
  }

  toString(): string {
    const s = this.#last;
    const state = s.running ? "running" : "stopped";
    const lines = [
      `Server(${this.modelName} at ${this.url}, ${state})`,
      `  model    ${this.modelId}, served as "${this.modelName}"${this.#apiKey ? " (API key required)" : ""}`,
    ];
    const names = Object.keys(this.adapters);
    if (names.length) lines.push(`  adapters ${names.map((n) => `"${n}" (${this.adapters[n]})`).join(", ")}`);
    lines.push(`  traffic  ${trafficLine(s)}`);
    if (s.cache) lines.push(`  cache    ${cacheLine(s.cache)}`);
    if (s.lastError) lines.push(`  last error  ${s.lastError}`);
    lines.push(`  openai   new OpenAI({ baseURL: "${this.url}", apiKey: "${this.#apiKey ?? "none"}" })`, `  curl     ${this.curlExample}`);
    return lines.join("\n");
  }

  #update(stats: ServerStats): void {
    this.#last = stats;
    this.#draw?.push(stats);
  }

  #ended(note: string, final?: ServerStats): ServerStats {
    if (note) this.#note = note;
    this.#last = { ...(final ?? this.#last), running: false, requestsActive: 0, requestsWaiting: 0, tokensPerSecond: 0 };
    this.#draw?.finish(this.#last);
    for (const done of [...this.#watchers]) done();
    this.#wake();
    return this.lastStats;
  }

  /** In a notebook, refresh while the cell that started the server is still running. */
  #watchCell(): void {
    const done = this.#sink.whenCellDone?.();
    if (!done) return;
    this.#cellRunning = true;
    void done.then(() => {
      this.#cellRunning = false;
      this.#wake();
    });
    this.#kick();
  }

  #refreshing(): boolean {
    return this.#last.running && this.#draw !== undefined && (this.#cellRunning || Date.now() < this.#until);
  }

  #kick(): void {
    if (this.#loop) return this.#wake();
    if (!this.#refreshing()) return;
    this.#loop = this.#refreshLoop().finally(() => {
      this.#loop = null;
      // A watch() that came in while the loop was ending.
      if (this.#refreshing()) this.#kick();
    });
  }

  async #refreshLoop(): Promise<void> {
    while (this.#refreshing()) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, REFRESH_MS);
        this.#wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.#wake = () => undefined;
      if (!this.#refreshing()) break;
      try {
        await this.stats();
      } catch (error) {
        this.#note = `live counters stopped: ${(error as Error).message ?? String(error)}`;
        this.#draw?.push(this.#last);
        break;
      }
    }
  }
}

Object.defineProperty(Server.prototype, inspect.custom, {
  value(this: Server): string {
    return this.toString();
  },
});

function toStats(w: WireStats): ServerStats {
  return {
    running: w.running,
    url: w.url,
    requestsTotal: w.requests_total,
    requestsActive: w.requests_active,
    requestsWaiting: w.requests_waiting,
    requestsRejected: w.requests_rejected ?? 0,
    errors: w.errors,
    tokensGenerated: w.tokens_generated,
    tokensPerSecond: w.tokens_per_second,
    ...(w.last_error === undefined ? {} : { lastError: w.last_error }),
    ...(w.last_error_at === undefined ? {} : { lastErrorAt: new Date(w.last_error_at * 1000) }),
    uptimeSeconds: w.uptime_s,
    adapters: [...(w.adapters ?? [])],
    ...(w.blocks_total === undefined ? {} : { cache: toCache(w) }),
  };
}

function toCache(w: WireStats): ServerCache {
  return {
    blocksTotal: w.blocks_total ?? 0,
    blocksUsed: w.blocks_used ?? 0,
    blockSize: w.block_size ?? 0,
    cacheBytes: w.cache_bytes ?? 0,
    prefixHitRate: w.prefix_hit_rate ?? 0,
    ...(w.memory_utilization === undefined ? {} : { memoryUtilization: w.memory_utilization }),
  };
}

function cacheLine(c: ServerCache): string {
  const gib = c.cacheBytes / 1024 ** 3;
  const size = gib >= 1 ? `${gib.toFixed(1)} GiB` : `${(c.cacheBytes / 1024 ** 2).toFixed(1)} MiB`;
  const share = c.memoryUtilization === undefined ? "" : ` · memory utilization ${c.memoryUtilization}`;
  return `${c.blocksUsed}/${c.blocksTotal} blocks of ${c.blockSize} tokens in use (${size}) · prefix hits ${(100 * c.prefixHitRate).toFixed(0)}%${share}`;
}

function trafficLine(s: ServerStats): string {
  const queue = (s.requestsWaiting ? `, ${s.requestsWaiting} waiting` : "") + (s.requestsRejected ? `, ${s.requestsRejected} turned away` : "");
  return (
    `${s.requestsTotal} request${s.requestsTotal === 1 ? "" : "s"} (${s.requestsActive} active${queue}) · ` +
    `${s.tokensPerSecond.toFixed(1)} tokens/s · ${s.errors} error${s.errors === 1 ? "" : "s"}`
  );
}

/** The live output: text/plain for any front end, text/html for a notebook. */
export function serverBundle(server: Server, s: ServerStats, note = ""): { data: Record<string, string> } {
  const state = s.running ? "serving" : "stopped";
  const head = `${state} ${server.modelName} at ${server.url}${note ? ` (${note})` : ""}`;
  const error = s.lastError ? `last error: ${s.lastError}` : "";
  const names = Object.keys(server.adapters);
  const adapters = names.length ? `adapters: ${names.join(", ")} (ask for one as \`model\`)` : "";
  const cache = s.cache && s.running ? `cache: ${cacheLine(s.cache)}` : "";
  const plain = [head, adapters, trafficLine(s), cache, error, s.running ? server.curlExample : ""].filter(Boolean).join("\n");
  const color = s.running ? "#388e3c" : "#888";
  const html =
    `<div style="font-family:var(--jp-code-font-family,monospace);font-size:smaller">` +
    `<div><b style="color:${color}">● ${escapeHtml(state)}</b> <b>${escapeHtml(server.modelName)}</b> at ` +
    `<code>${escapeHtml(server.url)}</code>${note ? ` <span style="opacity:.7">(${escapeHtml(note)})</span>` : ""}</div>` +
    (adapters ? `<div>${escapeHtml(adapters)}</div>` : "") +
    `<div>${escapeHtml(trafficLine(s))}</div>` +
    (cache ? `<div style="opacity:.8">${escapeHtml(cache)}</div>` : "") +
    (error ? `<div style="color:#d32f2f">${escapeHtml(error)}</div>` : "") +
    (s.running ? `<div style="opacity:.8;white-space:pre-wrap">${escapeHtml(server.curlExample)}</div>` : "") +
    `</div>`;
  return { data: { "text/plain": plain, "text/html": html } };
}
