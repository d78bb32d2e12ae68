import { describe, expect, it } from "vitest";
import type { EngineCache, StatusReply } from "../bridge/protocol.gen";
import { toWorkerStatus } from "./worker-status";

const GiB = 1024 ** 3;
const chat: EngineCache = {
  model_id: "tiny-qwen2",
  role: "chat",
  device: "cuda:0",
  blocks_total: 4096,
  blocks_used: 12,
  block_size: 16,
  cache_bytes: 48 * 1024 ** 2,
  prefix_hit_rate: 0.35,
  running: 1,
  waiting: 0,
};

function reply(engines: EngineCache[]): StatusReply {
  return {
    status: "ok",
    pid: 42,
    uptime_s: 12.5,
    models: [],
    running: [{ msg_id: "m1", msg_type: "generate", session: "s1", started: "2026-01-01T00:00:00Z" }],
    memory: [{ device: "cuda:0", kind: "cuda", used: 20 * GiB, total: 80 * GiB }],
    devices: ["cpu", "cuda:0"],
    engines,
  };
}

describe("qwen.status()", () => {
  it("reports each paged engine's cache in camelCase, with null for a share the engine was not sized by", () => {
    const server: EngineCache = { ...chat, role: "server", blocks_total: 90_000, blocks_used: 700, cache_bytes: 60 * GiB, memory_utilization: 0.9, waiting: 3 };
    const s = toWorkerStatus(reply([chat, server]), { log: "/tmp/worker.log", runtimeFile: "/tmp/worker.json" });
    expect(s.engines).toEqual([
      {
        modelId: "tiny-qwen2",
        role: "chat",
        device: "cuda:0",
        blocksTotal: 4096,
        blocksUsed: 12,
        blockSize: 16,
        cacheBytes: 48 * 1024 ** 2,
        memoryUtilization: null,
        prefixHitRate: 0.35,
        running: 1,
        waiting: 0,
      },
      {
        modelId: "tiny-qwen2",
        role: "server",
        device: "cuda:0",
        blocksTotal: 90_000,
        blocksUsed: 700,
        blockSize: 16,
        cacheBytes: 60 * GiB,
        memoryUtilization: 0.9,
        prefixHitRate: 0.35,
        running: 1,
        waiting: 3,
      },
    ]);
    expect(s).toMatchObject({
      pid: 42,
      uptimeSeconds: 12.5,
      running: [{ msgId: "m1", type: "generate", session: "s1" }],
      memory: [{ device: "cuda:0", used: 20 * GiB }],
      devices: ["cpu", "cuda:0"],
      log: "/tmp/worker.log",
      runtimeFile: "/tmp/worker.json",
    });
  });

  it("has an empty engines list when no paged engine runs", () => {
    expect(toWorkerStatus(reply([]), { log: "", runtimeFile: "" }).engines).toEqual([]);
  });

  it("reads a worker older than the engines field (it outlived an upgrade) as having none", () => {
    const { engines: _omitted, ...old } = reply([chat]);
    expect(toWorkerStatus(old, { log: "", runtimeFile: "" }).engines).toEqual([]);
  });
});
