// The worker's run index as files on disk (python-bridge/qwenbook_bridge/handlers/run_registry.py writes it): one
// JSON record per training run in <runtime dir>/qwenbook-runs. Read here when no worker is running, so
// that `qwen.runs()` and `npx qwenbook worker status` still show the runs a crashed worker left behind.
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type { RunInfo } from "./protocol.gen";
import { isPidAlive } from "./runtime";

export const RUNS_DIR_NAME = "qwenbook-runs";

const STATES: ReadonlySet<string> = new Set<RunInfo["state"]>(["running", "completed", "cancelled", "failed", "interrupted", "resumed"]);

/** The folder of run records beside the runtime file. */
export function runIndexDir(runtimeDir: string): string {
  return join(runtimeDir, RUNS_DIR_NAME);
}

/**
 * Every readable record, oldest start first. A run recorded as running whose worker is gone is
 * reported as the next worker will list it: interrupted, at its newest complete checkpoint.
 */
export function readRunIndex(runtimeDir: string): RunInfo[] {
  const folder = runIndexDir(runtimeDir);
  let names: string[];
  try {
    names = readdirSync(folder).filter((n) => n.endsWith(".json") && !n.startsWith("."));
  } catch {
    return [];
  }
  const runs: RunInfo[] = [];
  for (const name of names) {
    const info = parseRecord(join(folder, name));
    if (info) runs.push(info);
  }
  return runs.sort((a, b) => a.started.localeCompare(b.started));
}

function parseRecord(path: string): RunInfo | null {
  let raw: Record<string, unknown>;
  try {
    raw = JSON.parse(readFileSync(path, "utf8")) as Record<string, unknown>;
  } catch {
    return null; // not ours or unreadable: the worker skips it too
  }
  const strings = ["run_id", "model_id", "output_dir", "session", "started"] as const;
  if (raw.version !== 1 || strings.some((k) => typeof raw[k] !== "string") || !STATES.has(String(raw.state))) return null;
  const { version: _version, worker_pid: workerPid, ...fields } = raw;
  const info = { ...fields, step: Number.isInteger(raw.step) ? raw.step : 0 } as RunInfo;
  if (info.state === "running" && !(typeof workerPid === "number" && isPidAlive(workerPid))) {
    const checkpoint = newestCompleteCheckpoint(info.output_dir);
    info.state = "interrupted";
    if (checkpoint) {
      info.checkpoint = checkpoint.path;
      info.step = checkpoint.step;
    } else {
      delete info.checkpoint;
    }
  }
  return info;
}

/** What engine/train/checkpoints.py counts as complete: checkpoint-<step> holding both state files. */
export function newestCompleteCheckpoint(outputDir: string): { path: string; step: number } | null {
  let best: { path: string; step: number } | null = null;
  let names: string[];
  try {
    names = readdirSync(outputDir);
  } catch {
    return null;
  }
  for (const name of names) {
    const m = /^checkpoint-(\d+)$/.exec(name);
    if (!m) continue;
    const path = join(outputDir, name);
    if (!existsSync(join(path, "trainer_state.json")) || !existsSync(join(path, "training_state.pt"))) continue;
    const step = Number(m[1]);
    if (!best || step > best.step) best = { path, step };
  }
  return best;
}
