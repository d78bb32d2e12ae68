// The status reply as qwen.status() returns it: the wire's snake_case fields in camelCase.
import type { EngineCache as WireEngineCache, StatusReply } from "../bridge/protocol.gen";
import { toModelInfo } from "./model";
import type { EngineCache, WorkerStatus } from "./types";

/** Where this client found the worker, which the reply does not say. */
export interface WorkerPlace {
  log: string;
  runtimeFile: string;
}

export function toWorkerStatus(s: StatusReply, place: WorkerPlace): WorkerStatus {
  return {
    pid: s.pid,
    uptimeSeconds: s.uptime_s,
    models: s.models.map(toModelInfo),
    running: s.running.map((r) => ({ msgId: r.msg_id, type: r.msg_type, session: r.session, started: r.started })),
    memory: s.memory.map((m) => ({ ...m })),
    // A worker started before the field existed (it outlives upgrades) sends none.
    engines: (s.engines ?? []).map(toEngineCache),
    devices: [...s.devices],
    log: place.log,
    runtimeFile: place.runtimeFile,
  };
}

export function toEngineCache(w: WireEngineCache): EngineCache {
  return {
    modelId: w.model_id,
    role: w.role,
    device: w.device,
    blocksTotal: w.blocks_total,
    blocksUsed: w.blocks_used,
    blockSize: w.block_size,
    cacheBytes: w.cache_bytes,
    // The wire leaves out what has no value; a notebook reads an explicit null.
    memoryUtilization: w.memory_utilization ?? null,
    prefixHitRate: w.prefix_hit_rate,
    running: w.running,
    waiting: w.waiting,
  };
}
