import { inspect } from "node:util";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import type { WorkerClient } from "../bridge/client";
import type { DeviceMemory, EngineCache, GpuEvent, WorkerStatusEvent } from "../bridge/protocol.gen";
import { GPU_MIME, type GpuBundle } from "../display/bundles";
import { recordingSink, type RecordingSink } from "../display/testutil";
import { GpuGauge } from "./gpu";

const GiB = 1024 ** 3;
const cpu = (used: number): DeviceMemory => ({ device: "cpu", kind: "cpu", name: "process memory (RSS)", used, peak: used, total: 24 * GiB });

/** A stand-in for WorkerClient: status answers with `memory` and `engines`, broadcasts are sent by the test. */
function fakeClient(memory: () => DeviceMemory[], engines: () => EngineCache[] = () => []) {
  const listeners: { gpu: Set<(e: GpuEvent) => void>; worker_status: Set<(e: WorkerStatusEvent) => void> } = {
    gpu: new Set(),
    worker_status: new Set(),
  };
  const state = { closed: false, inFlight: 0, statusCalls: 0 };
  const client = {
    get closed() {
      return state.closed;
    },
    inFlight: () => Array.from({ length: state.inFlight }, () => ({ msgId: "x", type: "generate", started: new Date() })),
    subscribe(topic: "gpu" | "worker_status", handler: (e: never) => void) {
      const set = listeners[topic] as Set<(e: never) => void>;
      set.add(handler);
      return () => void set.delete(handler);
    },
    async request(type: string) {
      if (type !== "status") throw new Error(`unexpected ${type}`);
      state.statusCalls += 1;
      return { status: "ok", pid: 1, uptime_s: 1, models: [], running: [], memory: memory(), engines: engines(), devices: ["cpu"] };
    },
  };
  return {
    client: client as unknown as WorkerClient,
    state,
    listeners,
    broadcast: (devices: DeviceMemory[], time: number, engines?: EngineCache[]) =>
      listeners.gpu.forEach((h) => h(engines ? { devices, engines, time } : { devices, time })),
    workerState: (state: WorkerStatusEvent["state"]) => listeners.worker_status.forEach((h) => h({ state, running: 1 })),
  };
}

function gauge(sink: RecordingSink, client: WorkerClient, options = {}) {
  return new GpuGauge({ connection: async () => client, sink: () => sink }, options);
}

/** The gauges drawn, after the placeholder that holds the output's place. */
const bundles = (sink: RecordingSink) => sink.displays.slice(1).map((d) => d.data[GPU_MIME] as GpuBundle);

beforeEach(() => {
  vi.useFakeTimers();
});
afterEach(() => {
  vi.useRealTimers();
});

describe("qwen.gpu() in a notebook", () => {
  it("shows a snapshot at once, updates the same output from broadcasts while the cell runs, and ends not live", async () => {
    let endCell = () => undefined as void;
    const sink = recordingSink({ cellDone: new Promise<void>((r) => (endCell = r)) });
    const fake = fakeClient(() => [cpu(1 * GiB)]);
    const g = gauge(sink, fake.client);
    // Its output exists at once, so it sits above what the cell shows next.
    expect(sink.displays).toEqual([{ id: expect.any(String), update: false, data: { "text/plain": "GPU memory: asking the worker…" }, at: expect.any(Number) }]);
    await vi.advanceTimersByTimeAsync(0);
    expect(sink.displays).toHaveLength(2);
    expect(sink.displays[1]).toMatchObject({ update: true, id: sink.displays[0].id });
    expect(bundles(sink)[0]).toMatchObject({ live: true, intervalS: 1, devices: [{ device: "cpu", used: GiB, total: 24 * GiB, history: [GiB] }] });
    expect(sink.displays[1].data["text/plain"]).toContain("process RAM 1.0 GiB of 24.0 GiB machine RAM");
    // No paged engine runs: the gauge has no engines and no cache lines.
    expect(bundles(sink)[0]).not.toHaveProperty("engines");
    expect(sink.displays[1].data["text/plain"]).not.toContain("KV cache");

    // A request starts: the worker says it is busy and broadcasts once a second.
    fake.workerState("busy");
    for (let i = 2; i <= 4; i++) {
      await vi.advanceTimersByTimeAsync(1000);
      fake.broadcast([cpu(i * GiB)], 1000 + i);
    }
    expect(fake.state.statusCalls).toBe(1);
    expect(fake.listeners.gpu.size).toBe(1);
    endCell();
    await g;
    const all = bundles(sink);
    expect(sink.displays.slice(1).every((d) => d.update && d.id === sink.displays[0].id)).toBe(true);
    expect(all[all.length - 1]).toMatchObject({ live: false, time: 1004, devices: [{ used: 4 * GiB, history: [1, 2, 3, 4].map((n) => n * GiB) }] });
    expect(all.slice(0, -1).every((b) => b.live)).toBe(true);
    // Unsubscribed: later broadcasts change nothing.
    expect(fake.listeners.gpu.size).toBe(0);
    expect(fake.listeners.worker_status.size).toBe(0);
    expect(g.live).toBe(false);
    expect(sink.pins).toBe(1);
  });

  it("ends with the memory as a short request left it, even when it ended between broadcasts", async () => {
    let endCell = () => undefined as void;
    const sink = recordingSink({ cellDone: new Promise<void>((r) => (endCell = r)) });
    let used = 1;
    const fake = fakeClient(() => [cpu(used * GiB)]);
    const g = gauge(sink, fake.client);
    await vi.advanceTimersByTimeAsync(0);
    used = 3; // the request ran and left more memory in use, all within 400 ms
    await vi.advanceTimersByTimeAsync(400);
    endCell();
    await g;
    expect(fake.state.statusCalls).toBe(2);
    expect(bundles(sink).at(-1)!).toMatchObject({ live: false, devices: [{ used: 3 * GiB, history: [GiB, 3 * GiB] }] });
  });

  it("shows each paged engine's cache under its device, from the status snapshot and from broadcasts", async () => {
    let endCell = () => undefined as void;
    const sink = recordingSink({ cellDone: new Promise<void>((r) => (endCell = r)) });
    const chat: EngineCache = {
      model_id: "tiny-qwen2", role: "chat", device: "cpu", blocks_total: 4096, blocks_used: 12, block_size: 16,
      cache_bytes: 48 * 1024 ** 2, prefix_hit_rate: 0.35, running: 1, waiting: 0,
    };
    const fake = fakeClient(() => [cpu(GiB)], () => [chat]);
    const g = gauge(sink, fake.client);
    await vi.advanceTimersByTimeAsync(0);
    expect(bundles(sink)[0].engines).toEqual([chat]);
    expect(sink.displays[1].data["text/plain"]).toBe(
      "cpu process RAM 1.0 GiB of 24.0 GiB machine RAM (4%) (no GPU in use)\n" +
        "  KV cache (chat, tiny-qwen2): 12 / 4,096 blocks · 48 MiB · prefix hits 35%",
    );

    // A server starts beside the chat engine; the broadcasts carry both.
    const server: EngineCache = { ...chat, role: "server", blocks_total: 512, blocks_used: 40, cache_bytes: 4 * 1024 ** 2, memory_utilization: 0.9, prefix_hit_rate: 0 };
    fake.workerState("busy");
    await vi.advanceTimersByTimeAsync(1000);
    fake.broadcast([cpu(2 * GiB)], 1002, [{ ...chat, blocks_used: 30 }, server]);
    await vi.advanceTimersByTimeAsync(300);
    expect(bundles(sink).at(-1)!.engines?.map((e) => [e.role, e.blocks_used])).toEqual([["chat", 30], ["server", 40]]);
    expect(sink.displays.at(-1)!.data["text/plain"]).toContain("\n  KV cache (server, tiny-qwen2): 40 / 512 blocks · 4 MiB · prefix hits 0%");
    endCell();
    await g;
  });

  it("shows a several-rank run's ranks beside the worker's own devices", async () => {
    let endCell = () => undefined as void;
    const sink = recordingSink({ cellDone: new Promise<void>((r) => (endCell = r)) });
    const fake = fakeClient(() => [cpu(GiB)]);
    const g = gauge(sink, fake.client);
    await vi.advanceTimersByTimeAsync(0);
    g.showRanks([0, 1].map((rank) => ({ rank, device: `cuda:${rank}`, name: "NVIDIA H200", used: 17 * GiB, peak: 18 * GiB, total: 140 * GiB })));
    await vi.advanceTimersByTimeAsync(300);
    const shown = bundles(sink).at(-1)!.devices;
    expect(shown.map((d) => d.device)).toEqual(["cpu", "rank 0 · cuda:0", "rank 1 · cuda:1"]);
    expect(shown[2]).toMatchObject({ kind: "cuda", name: "NVIDIA H200", used: 17 * GiB, peak: 18 * GiB, total: 140 * GiB });
    endCell();
    await g;
    // The worker's later samples keep the ranks beside them.
    expect(bundles(sink).at(-1)!.devices).toHaveLength(3);
  });

  it("keeps updating after the cell has ended while watched, polling an idle worker once a second", async () => {
    let used = 1;
    const sink = recordingSink({ cellDone: Promise.resolve() });
    const fake = fakeClient(() => [cpu(used++ * GiB)]);
    const g = gauge(sink, fake.client).watch(5);
    expect(inspect(g)).toMatch(/^GpuGauge\(live, watching [45] s\)$/);
    let settled = false;
    void g.then(() => (settled = true));
    await vi.advanceTimersByTimeAsync(4500);
    expect(settled).toBe(false);
    await vi.advanceTimersByTimeAsync(1000);
    expect(settled).toBe(true);
    const last = bundles(sink).at(-1)!;
    expect(last.live).toBe(false);
    // One snapshot at the start and one per idle second.
    expect(fake.state.statusCalls).toBeGreaterThanOrEqual(5);
    expect(last.devices[0].history).toHaveLength(fake.state.statusCalls);
    expect(String(g)).toBe("GpuGauge(stopped)");
  });

  it("ends when its watch does if the cell awaits it, though the cell is still running", async () => {
    const sink = recordingSink({ cellDone: new Promise<void>(() => undefined) });
    let settled = false;
    void gauge(sink, fakeClient(() => [cpu(GiB)]).client)
      .watch(2)
      .then(() => (settled = true));
    await vi.advanceTimersByTimeAsync(1500);
    expect(settled).toBe(false);
    await vi.advanceTimersByTimeAsync(1000);
    expect(settled).toBe(true);
    // A sample at the start and one each second after.
    expect(bundles(sink).at(-1)!).toMatchObject({ live: false, devices: [{ history: [GiB, GiB, GiB] }] });
  });

  it("takes watch as an option too, and checks it", async () => {
    const fake = fakeClient(() => [cpu(GiB)]);
    expect(() => gauge(recordingSink(), fake.client, { watch: 0 })).toThrow(/gpu option watch must be greater than 0, got 0/);
    expect(() => gauge(recordingSink(), fake.client, { wach: 3 })).toThrow(/wach/);
    const g = gauge(recordingSink({ cellDone: Promise.resolve() }), fake.client, { watch: 2 });
    expect(() => g.watch(-1)).toThrow(RangeError);
    expect(() => g.watch("10" as unknown as number)).toThrow(TypeError);
    g.stop();
    await vi.advanceTimersByTimeAsync(0);
    await g;
    expect(() => g.watch(5)).toThrow(/has stopped updating; start a new one with qwen.gpu\(\).watch\(seconds\)/);
  });

  it("stops when the worker says it is stopping", async () => {
    const sink = recordingSink({ cellDone: new Promise<void>(() => undefined) });
    const fake = fakeClient(() => [cpu(GiB)]);
    const g = gauge(sink, fake.client);
    await vi.advanceTimersByTimeAsync(0);
    fake.workerState("stopping");
    await g;
    expect(bundles(sink).at(-1)!.live).toBe(false);
  });
});

describe("qwen.gpu() in a script", () => {
  it("prints one snapshot and stays live while this client has requests in flight", async () => {
    const sink = recordingSink({ rich: false });
    const fake = fakeClient(() => [cpu(GiB)]);
    fake.state.inFlight = 1;
    let settled = false;
    void gauge(sink, fake.client).then(() => (settled = true));
    await vi.advanceTimersByTimeAsync(3000);
    expect(settled).toBe(false);
    fake.state.inFlight = 0;
    await vi.advanceTimersByTimeAsync(1000);
    expect(settled).toBe(true);
  });

  it("prints one snapshot line, and reports a failure when nobody awaits the gauge", async () => {
    const terminal = recordingSink({ rich: false });
    void gauge(terminal, fakeClient(() => [cpu(GiB)]).client).then(() => undefined);
    await vi.advanceTimersByTimeAsync(0);
    expect(terminal.displays.map((d) => d.update)).toEqual([false, true]);

    const sink = recordingSink({ rich: false });
    new GpuGauge({ connection: async () => Promise.reject(new Error("no worker")), sink: () => sink });
    await vi.advanceTimersByTimeAsync(0);
    expect(sink.texts).toEqual(["qwenbook: the memory gauge stopped: no worker\n"]);
    expect(sink.displays).toEqual([]);

    const quiet = recordingSink({ rich: false });
    const awaited = new GpuGauge({ connection: async () => Promise.reject(new Error("no worker")), sink: () => quiet });
    await expect(awaited).rejects.toThrow("no worker");
    expect(quiet.texts).toEqual([]);
  });

  it("replaces its placeholder with the reason in a notebook when it cannot start", async () => {
    const sink = recordingSink();
    const g = new GpuGauge({ connection: async () => Promise.reject(new Error("no worker")), sink: () => sink });
    await expect(g).rejects.toThrow("no worker");
    expect(sink.displays.map((d) => [d.update, d.data["text/plain"]])).toEqual([
      [false, "GPU memory: asking the worker…"],
      [true, "GPU memory: the gauge could not start: no worker"],
    ]);
    expect(sink.texts).toEqual([]);
  });
});
