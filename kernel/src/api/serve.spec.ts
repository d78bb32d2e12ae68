import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { inspect } from "node:util";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import type { WorkerClient } from "../bridge/client";
import type { ServerInfo, ServeStats } from "../bridge/protocol.gen";
import { recordingSink, type RecordingSink } from "../display/testutil";
import { SERVE_USAGE, serveArgs } from "../cli/serve";
import { Server, serveRequest } from "./serve";

const URL_ = "http://127.0.0.1:8000/v1";
const CURL = `curl ${URL_}/chat/completions -H "Content-Type: application/json" -H "Authorization: Bearer sk-local" -d '{}'`;

function stats(patch: Partial<ServeStats> = {}): ServeStats {
  return {
    running: true, url: URL_, host: "127.0.0.1", port: 8000, model_name: "qwen-huanhuan", requests_total: 0,
    requests_active: 0, requests_waiting: 0, errors: 0, tokens_generated: 0, tokens_per_second: 0, uptime_s: 0, ...patch,
  };
}

function info(s: ServeStats = stats()): ServerInfo {
  return {
    server_id: "qwen-huanhuan@127.0.0.1:8000", model_id: "tiny:fp32:cpu", name: "qwen-huanhuan", url: URL_, host: "127.0.0.1",
    port: 8000, auth: true, max_batch_size: 32, curl_example: CURL, stats: s,
  };
}

/** A stand-in for WorkerClient answering serve_status / serve_stop from `live`. */
function fakeClient(pid = 7) {
  const state = { live: stats() as ServeStats | null, calls: [] as string[] };
  const client = {
    info: { pid },
    async request(type: string, content: { server_id: string }) {
      state.calls.push(type);
      expect(content.server_id).toBe("qwen-huanhuan@127.0.0.1:8000");
      if (type === "serve_status") return { status: "ok", servers: state.live ? [info(state.live)] : [] };
      if (type === "serve_stop") {
        const last = state.live;
        state.live = null;
        return { status: "ok", stopped: last ? [info({ ...last, running: false })] : [] };
      }
      throw new Error(`unexpected ${type}`);
    },
  };
  return { client: client as unknown as WorkerClient, state };
}

function server(sink: RecordingSink, client: WorkerClient, pid = 7) {
  return new Server({ connection: async () => client, sink: () => sink }, info(), pid, "sk-local");
}

const plain = (sink: RecordingSink, i = -1) => String(sink.displays.at(i)!.data["text/plain"]);

/** Two adapter folders (adapter_config.json is all the kernel looks at), a model folder and an empty one. */
function folders() {
  const root = mkdtempSync(join(tmpdir(), "serve-spec-"));
  const make = (name: string, file?: string) => {
    const dir = join(root, name);
    mkdirSync(dir);
    if (file) writeFileSync(join(dir, file), "{}");
    return dir;
  };
  return {
    root, huanhuan: make("huanhuan", "adapter_config.json"), odd: make("a=b", "adapter_config.json"),
    model: make("model", "config.json"), empty: make("empty"),
  };
}

beforeEach(() => {
  vi.useFakeTimers();
});
afterEach(() => {
  vi.useRealTimers();
});

describe("Server", () => {
  it("shows URL, name, traffic and a curl example when inspected", () => {
    const s = server(recordingSink({ rich: false }), fakeClient().client);
    const shown = inspect(s);
    expect(shown).toMatch(/^Server\(qwen-huanhuan at http:\/\/127\.0\.0\.1:8000\/v1, running\)/);
    expect(shown).toContain('served as "qwen-huanhuan" (API key required)');
    expect(shown).toContain("0 requests (0 active) · 0.0 tokens/s · 0 errors");
    expect(shown).toContain(`curl     ${CURL}`);
    expect(String(s)).toBe(shown);
  });

  it("lists its adapters and the engine's cache", () => {
    const cache = { adapters: ["huanhuan"], memory_utilization: 0.9, blocks_total: 100, blocks_used: 25, block_size: 16, cache_bytes: 3 * 1024 ** 3, prefix_hit_rate: 0.5 };
    const s = new Server({ connection: async () => fakeClient().client, sink: () => recordingSink({ rich: false }) },
      { ...info(stats(cache)), adapters: { huanhuan: "/runs/huanhuan" } }, 7, undefined);
    expect(s.adapters).toEqual({ huanhuan: "/runs/huanhuan" });
    expect(s.lastStats.adapters).toEqual(["huanhuan"]);
    expect(s.lastStats.cache).toEqual({ blocksTotal: 100, blocksUsed: 25, blockSize: 16, cacheBytes: 3 * 1024 ** 3, prefixHitRate: 0.5, memoryUtilization: 0.9 });
    const shown = inspect(s);
    expect(shown).toContain('adapters "huanhuan" (/runs/huanhuan)');
    expect(shown).toContain("cache    25/100 blocks of 16 tokens in use (3.0 GiB) · prefix hits 50% · memory utilization 0.9");
    // An engine without a block cache (the padded scheduler) reports none.
    const bare = server(recordingSink({ rich: false }), fakeClient().client);
    expect(bare.lastStats.cache).toBeUndefined();
    expect(bare.lastStats.adapters).toEqual([]);
    expect(bare.adapters).toEqual({});
  });

  it("counts the requests a full queue turned away", () => {
    const host = { connection: async () => fakeClient().client, sink: () => recordingSink({ rich: false }) };
    const s = new Server(host, info(stats({ requests_waiting: 2, requests_rejected: 3 })), 7, "sk-local");
    expect(inspect(s)).toContain("0 requests (0 active, 2 waiting, 3 turned away)");
    expect(s.lastStats.requestsRejected).toBe(3);
    expect(server(recordingSink({ rich: false }), fakeClient().client).lastStats.requestsRejected).toBe(0);
  });

  it("prints one line in a terminal and draws no rich output", () => {
    const sink = recordingSink({ rich: false });
    server(sink, fakeClient().client);
    expect(sink.texts).toEqual([`serving tiny:fp32:cpu as "qwen-huanhuan" at ${URL_}\n`]);
    expect(sink.displays).toHaveLength(0);
  });

  it("in a notebook, draws a text + html output, refreshes it on stats() and while the cell runs, and ends it on stop()", async () => {
    let endCell = () => undefined as void;
    const sink = recordingSink({ cellDone: new Promise<void>((r) => (endCell = r)) });
    const fake = fakeClient();
    const s = server(sink, fake.client);
    expect(sink.displays).toHaveLength(1);
    expect(sink.displays[0]).toMatchObject({ update: false });
    expect(Object.keys(sink.displays[0].data).sort()).toEqual(["text/html", "text/plain"]);
    expect(plain(sink, 0)).toContain(`serving qwen-huanhuan at ${URL_}`);

    fake.state.live = stats({ requests_total: 3, requests_active: 2, tokens_per_second: 41.25 });
    await vi.advanceTimersByTimeAsync(1000); // the cell is still running: one refresh a second
    expect(plain(sink)).toContain("3 requests (2 active) · 41.3 tokens/s · 0 errors");
    endCell();
    await vi.advanceTimersByTimeAsync(5000);
    const polled = fake.state.calls.length;

    fake.state.live = stats({ requests_total: 4, errors: 1, last_error: "401: You didn't provide an API key.", last_error_at: 1 });
    const now = await s.stats();
    expect(now).toMatchObject({ requestsTotal: 4, errors: 1, lastError: "401: You didn't provide an API key.", lastErrorAt: new Date(1000) });
    await vi.advanceTimersByTimeAsync(2000);
    expect(plain(sink)).toContain("last error: 401: You didn't provide an API key.");
    expect(String(sink.displays.at(-1)!.data["text/html"])).toContain("last error: 401: You didn&#39;t provide an API key.");
    expect(fake.state.calls.length).toBe(polled + 1); // no polling after the cell ended

    const final = await s.stop();
    expect(final.running).toBe(false);
    expect(plain(sink)).toMatch(/^stopped qwen-huanhuan at .* \(stopped\)/);
    expect(sink.displays.every((d) => d.id === sink.displays[0].id)).toBe(true);
    expect(sink.displays.slice(1).every((d) => d.update)).toBe(true);
    expect((await s.stop()).running).toBe(false);
    expect(fake.state.calls.filter((c) => c === "serve_stop")).toHaveLength(1);
  });

  it("watch(seconds) refreshes for that long and resolves with the counters", async () => {
    const sink = recordingSink();
    const fake = fakeClient();
    const s = server(sink, fake.client);
    const watched = s.watch(3);
    fake.state.live = stats({ requests_total: 9 });
    await vi.advanceTimersByTimeAsync(3000);
    expect((await watched).requestsTotal).toBe(9);
    const calls = fake.state.calls.length;
    await vi.advanceTimersByTimeAsync(5000);
    expect(fake.state.calls.length).toBe(calls);
    expect(() => s.watch(0)).toThrow(/watch\(seconds\) must be greater than 0/);
  });

  it("reports a server that went away (stopped elsewhere, or a restarted worker) as stopped", async () => {
    const fake = fakeClient();
    const s = server(recordingSink({ rich: false }), fake.client);
    fake.state.live = null;
    expect((await s.stats()).running).toBe(false);
    expect(s.running).toBe(false);

    const restarted = server(recordingSink({ rich: false }), fakeClient(8).client, 7);
    expect((await restarted.stop()).running).toBe(false);
  });
});

describe("serve options", () => {
  it("default to port 8000 and map to the wire names", () => {
    expect(serveRequest({})).toEqual({ port: 8000 });
    expect(serveRequest({ port: 0, host: "0.0.0.0", apiKey: "sk-local", name: "qwen-huanhuan", maxBatchSize: 8 })).toEqual({
      port: 0, host: "0.0.0.0", api_key: "sk-local", name: "qwen-huanhuan", max_batch_size: 8,
    });
  });

  it("fail eagerly with the option's name", () => {
    expect(() => serveRequest({ port: 8000.5 })).toThrow("serve option port must be a whole number, got 8000.5");
    expect(() => serveRequest({ port: -1 })).toThrow("serve option port must be at least 0, got -1 (0 picks a free port)");
    expect(() => serveRequest({ host: "" })).toThrow("serve option host must not be empty");
    expect(() => serveRequest({ apiKey: "sk local" })).toThrow(/apiKey must not contain spaces/);
    expect(() => serveRequest({ name: " padded" })).toThrow(/name must not start or end with spaces/);
    expect(() => serveRequest({ maxBatchSize: 5000 })).toThrow("serve option maxBatchSize must be at most 1024, got 5000");
    expect(() => serveRequest({ apikey: "x" } as never)).toThrow('serve(options) has no option "apikey"');
  });

  it("carry the overload limits: queue, body size, Retry-After and the slow-client timeout", () => {
    expect(serveRequest({ maxQueue: 0, maxBody: 8 * 1024 ** 2, retryAfter: 5, clientTimeout: 2.5 })).toEqual({
      port: 8000, max_queue: 0, max_body_bytes: 8 * 1024 ** 2, retry_after_s: 5, client_timeout_s: 2.5,
    });
    expect(() => serveRequest({ maxQueue: -1 })).toThrow("serve option maxQueue must be at least 0, got -1 (0 accepts only what fits in the batch)");
    expect(() => serveRequest({ maxQueue: 2.5 })).toThrow("serve option maxQueue must be a whole number, got 2.5");
    expect(() => serveRequest({ maxBody: 100 })).toThrow("serve option maxBody must be at least 1024, got 100 (bytes, e.g. 8 * 1024 ** 2 for 8 MiB)");
    expect(() => serveRequest({ maxBody: "4MiB" as never })).toThrow('serve option maxBody expects a number, got the string "4MiB"');
    expect(() => serveRequest({ retryAfter: 0 })).toThrow("serve option retryAfter must be at least 1, got 0 (seconds)");
    expect(() => serveRequest({ clientTimeout: 0 })).toThrow("serve option clientTimeout must be at least 0.1, got 0 (seconds)");
    expect(() => serveRequest({ maxqueue: 3 } as never)).toThrow('serve(options) has no option "maxqueue"');
  });

  it("carry adapters by name, their folders absolute, and the memory utilization", () => {
    const f = folders();
    const fromHere = relative(process.cwd(), f.huanhuan);
    expect(serveRequest({ adapters: { huanhuan: fromHere, other: f.odd }, memoryUtilization: 0.5 })).toEqual({
      port: 8000, adapters: { huanhuan: f.huanhuan, other: f.odd }, memory_utilization: 0.5,
    });
    expect(serveRequest({ adapters: {}, memoryUtilization: 1 })).toEqual({ port: 8000, memory_utilization: 1 });
    expect(() => serveRequest({ adapters: [f.huanhuan] as never })).toThrow(
      'serve option adapters must map a name to an adapter folder, e.g. { huanhuan: "runs/huanhuan" }, got an array',
    );
    expect(() => serveRequest({ adapters: f.huanhuan as never })).toThrow("serve option adapters must map a name to an adapter folder");
    expect(() => serveRequest({ adapters: { " x": f.huanhuan } })).toThrow('serve option adapters: a name must be non-empty, without surrounding spaces or line breaks, got " x"');
    expect(() => serveRequest({ name: "qwen", adapters: { qwen: f.huanhuan } })).toThrow('serve option adapters: "qwen" is already the model\'s name');
    expect(() => serveRequest({ adapters: { x: 3 as never } })).toThrow("serve option adapters.x expects an adapter folder");
    expect(() => serveRequest({ adapters: { x: join(f.root, "nothing") } })).toThrow(`No adapter folder at ${join(f.root, "nothing")}`);
    expect(() => serveRequest({ adapters: { x: f.model } })).toThrow(`${f.model} is not a LoRA adapter folder: it has no adapter_config.json; it is a full model folder`);
    expect(() => serveRequest({ adapters: { x: f.empty } })).toThrow("is not a LoRA adapter folder");
    expect(() => serveRequest({ memoryUtilization: 0 })).toThrow("serve option memoryUtilization must be greater than 0, got 0 (a fraction of the device's memory, e.g. 0.9)");
    expect(() => serveRequest({ memoryUtilization: 1.5 })).toThrow("serve option memoryUtilization must be at most 1, got 1.5");
    expect(() => serveRequest({ memoryUtilization: "90%" as never })).toThrow('serve option memoryUtilization expects a number, got the string "90%"');
  });
});

describe("qwenbook serve command line", () => {
  it("becomes serve_cli's arguments", () => {
    expect(serveArgs(["Qwen/Qwen2.5-7B-Instruct", "--port", "8000", "--api-key", "sk-local", "--host", "0.0.0.0", "--name", "qwen"])).toEqual([
      "-m", "qwenbook_bridge.openai.cli", "Qwen/Qwen2.5-7B-Instruct", "--port", "8000", "--host", "0.0.0.0", "--api-key", "sk-local", "--name", "qwen",
    ]);
  });

  it("passes the overload limits on, sizes in bytes", () => {
    const args = serveArgs(["m", "--max-queue", "64", "--max-body", "8MiB", "--retry-after", "3", "--client-timeout", "2.5"]);
    expect(args.slice(3)).toEqual(["--max-queue", "64", "--max-body", String(8 * 1024 ** 2), "--retry-after", "3", "--client-timeout", "2.5"]);
    expect(serveArgs(["m", "--max-body", "4194304"]).slice(3)).toEqual(["--max-body", "4194304"]);
    expect(serveArgs(["m", "--max-body", "512k"]).slice(3)).toEqual(["--max-body", String(512 * 1024)]);
    expect(() => serveArgs(["m", "--max-queue=-1"])).toThrow('--max-queue must be a whole number from 0 to 1000000, got "-1"');
    expect(() => serveArgs(["m", "--max-body", "4 parsecs"])).toThrow('--max-body must be a size in bytes or with KiB, MiB or GiB (e.g. 8MiB), got "4 parsecs"');
    expect(() => serveArgs(["m", "--max-body", "10"])).toThrow('--max-body must be from 1KiB to 1GiB, got "10"');
    expect(() => serveArgs(["m", "--retry-after", "0"])).toThrow('--retry-after must be a whole number from 1 to 3600, got "0"');
    expect(() => serveArgs(["m", "--client-timeout", "soon"])).toThrow('--client-timeout must be a number of seconds from 0.1 to 3600, got "soon"');
  });

  it("passes adapters on as NAME=DIR with absolute folders, a bare DIR named after its folder", () => {
    const f = folders();
    const args = serveArgs(["m", "--adapter", `hh=${relative(process.cwd(), f.huanhuan)}`, "--adapter", f.huanhuan, "--adapter", f.odd, "--memory-utilization", "0.5"]);
    expect(args.slice(3)).toEqual(["--adapter", `hh=${f.huanhuan}`, "--adapter", `huanhuan=${f.huanhuan}`, "--adapter", `a=b=${f.odd}`, "--memory-utilization", "0.5"]);
    expect(() => serveArgs(["m", "--adapter", `x=${f.huanhuan}`, "--adapter", `x=${f.odd}`])).toThrow(`--adapter names "x" twice (${f.huanhuan} and ${f.odd})`);
    expect(() => serveArgs(["m", "--name", "qwen", "--adapter", `qwen=${f.huanhuan}`])).toThrow('"qwen" is already the base model\'s name (--name)');
    expect(() => serveArgs(["m", "--adapter", `=${f.huanhuan}`])).toThrow("no adapter name; write NAME=DIR");
    expect(() => serveArgs(["m", "--adapter", "x="])).toThrow("no adapter folder; write NAME=DIR, e.g. x=./out/adapter");
    expect(() => serveArgs(["m", "--adapter", `x=${f.model}`])).toThrow("is not a LoRA adapter folder (it has no adapter_config.json)");
    expect(() => serveArgs(["m", "--adapter", "x=/no/such/folder"])).toThrow("--adapter x=/no/such/folder: no such folder /no/such/folder");
    expect(() => serveArgs(["m", "--memory-utilization", "0"])).toThrow('--memory-utilization must be a fraction in (0, 1], e.g. 0.9, got "0"');
    expect(() => serveArgs(["m", "--memory-utilization", "90%"])).toThrow("--memory-utilization must be a fraction");
    expect(SERVE_USAGE).toContain("--adapter NAME=DIR");
    // vLLM's spelling: several adapters after one --lora-modules, NAME=DIR or its JSON form.
    const json = JSON.stringify({ name: "j", path: f.odd, base_model_name: "m" });
    expect(serveArgs(["m", "--lora-modules", `a=${f.huanhuan}`, json, "--port", "0"]).slice(3)).toEqual([
      "--port", "0", "--adapter", `a=${f.huanhuan}`, "--adapter", `j=${f.odd}`,
    ]);
    expect(serveArgs(["m", `--lora-modules=b=${f.huanhuan}`]).slice(3)).toEqual(["--adapter", `b=${f.huanhuan}`]);
    expect(() => serveArgs(["m", "--lora-modules", "--port", "0"])).toThrow("--lora-modules needs one or more NAME=DIR after it");
    expect(() => serveArgs(["m", "--lora-modules", '{"name": "j"}'])).toThrow('needs a non-empty "name" and "path"');
    expect(() => serveArgs(["m", "--lora-modules", "{oops"])).toThrow("not valid JSON");
  });

  it("refuses a wrong command line before anything starts", () => {
    expect(() => serveArgs([])).toThrow("serve needs the model to serve");
    expect(() => serveArgs(["m", "--port", "80a"])).toThrow('--port must be a whole number from 0 to 65535, got "80a"');
    expect(() => serveArgs(["m", "--port"])).toThrow(/--port/);
    expect(() => serveArgs(["m", "--prot", "1"])).toThrow(/Unknown option '--prot'/);
    expect(() => serveArgs(["m", "--device", "gpu"])).toThrow("--device must be auto, cpu, cuda or cuda:N");
    expect(() => serveArgs(["m", "--adapter", "/no/such/folder"])).toThrow("--adapter /no/such/folder: no such folder");
    expect(() => serveArgs(["a", "b"])).toThrow('serve takes one model, got "a", "b"');
  });
});
