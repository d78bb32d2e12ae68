import { spawn } from "node:child_process";
import { closeSync, mkdirSync, openSync, readFileSync, rmSync, statSync, writeSync } from "node:fs";
import { dirname, join } from "node:path";
import { llamaCppLibDir, PYTHON_HINT, resolvePython } from "./paths";
import { isPidAlive, readRuntimeFile, removeStaleRuntimeFile, tailOfFile, type RuntimeInfo, type Transport } from "./runtime";

export interface SpawnOptions {
  /** Where the worker must write its runtime file. */
  runtimeFile: string;
  /** Python executable; defaults to resolvePython(). */
  python?: string;
  /** auto, cpu, cuda or cuda:N. */
  device?: string;
  /**
   * ipc (Unix domain sockets in a user-only folder; the worker's default on Linux and macOS) or tcp
   * (127.0.0.1 ports any local user can connect to). Default: the worker's choice, which follows $QWENBOOK_TRANSPORT.
   */
  transport?: Transport;
  /** Worker log; defaults to qwenbook-worker.log beside the runtime file. */
  logFile?: string;
  /** How long the worker may take to import torch and bind its sockets. */
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
}

const POLL_MS = 100;

/**
 * Returns the live worker named by the runtime file, starting one if there is none.
 *
 * A lock file beside the runtime file makes two kernels starting at once share one worker
 * instead of racing to start two.
 */
export async function ensureWorker(options: SpawnOptions): Promise<RuntimeInfo> {
  const existing = liveRuntime(options.runtimeFile);
  if (existing) return existing;
  const lock = `${options.runtimeFile}.lock`;
  mkdirSync(dirname(options.runtimeFile), { recursive: true, mode: 0o700 });
  const deadline = Date.now() + (options.timeoutMs ?? 120_000);
  for (;;) {
    if (takeLock(lock)) {
      try {
        return liveRuntime(options.runtimeFile) ?? (await spawnWorker(options));
      } finally {
        rmSync(lock, { force: true });
      }
    }
    // Another process is starting the worker: wait for it rather than start a second one.
    const info = liveRuntime(options.runtimeFile);
    if (info) return info;
    if (Date.now() > deadline) {
      throw new Error(`Timed out waiting for another process to start the worker (lock ${lock}). Delete the lock file if no one is starting it.`);
    }
    await sleep(POLL_MS);
  }
}

/** The runtime file's worker if its pid is alive; a file left by a dead worker is removed. */
export function liveRuntime(runtimeFile: string): RuntimeInfo | null {
  const info = readRuntimeFile(runtimeFile);
  if (!info) return null;
  if (isPidAlive(info.pid)) return info;
  removeStaleRuntimeFile(runtimeFile, info.pid);
  return null;
}

function takeLock(lock: string): boolean {
  try {
    const fd = openSync(lock, "wx", 0o600);
    writeSync(fd, String(process.pid));
    closeSync(fd);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
  }
  // A lock whose owner is gone (a kernel killed mid-start) must not block everyone forever. An
  // empty one may be a lock whose owner has not written its pid yet, so it is only stale once old.
  const text = readFileSafe(lock);
  const owner = Number(text);
  if (text === "" ? ageMs(lock) < 5_000 : Number.isInteger(owner) && owner > 0 && isPidAlive(owner)) return false;
  rmSync(lock, { force: true });
  return false;
}

function ageMs(path: string): number {
  try {
    return Date.now() - statSync(path).mtimeMs;
  } catch {
    return Infinity;
  }
}

function readFileSafe(path: string): string {
  try {
    return readFileSync(path, "utf8").trim();
  } catch {
    return "";
  }
}

/**
 * glibc's malloc backs its large blocks with transparent huge pages when this tunable is set (glibc 2.35+; older
 * versions, musl and macOS ignore it). A CPU worker's tensors are large and short-lived (the logits over a
 * 152k-word vocabulary are hundreds of MB a step), and without it each is mapped fresh and faulted in 4 KB at a
 * time: the suites' CPU training and generation tests took 62 s of CPU without it and 42 s with it, same minutes.
 */
const HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1";

/** GLIBC_TUNABLES with huge pages added after the caller's entries; a caller's own hugetlb setting wins. */
export function withHugePages(tunables: string | undefined): string {
  const entries = (tunables ?? "").split(":").filter(Boolean);
  if (entries.some((e) => e.startsWith("glibc.malloc.hugetlb="))) return entries.join(":");
  return [...entries, HUGE_PAGES_TUNABLE].join(":");
}

/**
 * The worker's environment: the caller's, plus where llama.cpp is (its CPU chat engine) unless set, and on Linux
 * malloc's huge pages (see HUGE_PAGES_TUNABLE) added to any GLIBC_TUNABLES the caller has.
 */
export function workerEnv(env: NodeJS.ProcessEnv, platform: NodeJS.Platform = process.platform): NodeJS.ProcessEnv {
  const out: NodeJS.ProcessEnv = { ...env, PYTHONUNBUFFERED: "1" };
  if (!out.QWENBOOK_LLAMA_CPP_LIB) {
    const lib = llamaCppLibDir();
    if (lib) out.QWENBOOK_LLAMA_CPP_LIB = lib;
  }
  if (platform === "linux") out.GLIBC_TUNABLES = withHugePages(out.GLIBC_TUNABLES);
  return out;
}

/**
 * Starts `python -m qwenbook_bridge.worker` in its own session with output appended to its log,
 * so a kernel restart or crash does not take the worker (and its loaded models) with it, and
 * waits until it has written a runtime file naming its pid.
 */
export async function spawnWorker(options: SpawnOptions): Promise<RuntimeInfo> {
  const choice = options.python ? { command: options.python, reason: "an explicit python" } : resolvePython(options.env);
  const python = choice.command;
  const runtimeDir = dirname(options.runtimeFile);
  mkdirSync(runtimeDir, { recursive: true, mode: 0o700 });
  const log = options.logFile ?? join(runtimeDir, "qwenbook-worker.log");
  const args = ["-m", "qwenbook_bridge.worker", "--runtime-file", options.runtimeFile, "--log", log];
  if (options.device) args.push("--device", options.device);
  if (options.transport) args.push("--transport", options.transport);
  const fd = openSync(log, "a", 0o600);
  writeSync(fd, `\n--- ${new Date().toISOString()} starting: ${python} ${args.join(" ")}\n`);
  const timeoutMs = options.timeoutMs ?? 120_000;
  let child;
  try {
    child = spawn(python, args, {
      // Its own folder: the worker outlives whatever directory the kernel was started in.
      cwd: runtimeDir,
      detached: true,
      stdio: ["ignore", fd, fd],
      env: workerEnv(options.env ?? process.env),
    });
  } finally {
    closeSync(fd);
  }
  child.unref();

  // Filled in by the child's callbacks; a holder object keeps TypeScript from narrowing them to null.
  const seen: { exit: { code: number | null; signal: NodeJS.Signals | null } | null; error: Error | null } = {
    exit: null,
    error: null,
  };
  child.once("exit", (code, signal) => (seen.exit = { code, signal }));
  child.once("error", (e) => (seen.error = e));

  const quoteLog = (): string => {
    const tail = tailOfFile(log, 30);
    return tail ? `\nThe end of its log (${log}):\n${tail}` : `\nIts log (${log}) is empty.`;
  };
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (seen.error) {
      throw new Error(
        `Could not run the worker's python "${python}" (chosen from ${choice.reason}): ${seen.error.message}. ` +
          PYTHON_HINT,
      );
    }
    const info = readRuntimeFile(options.runtimeFile);
    if (info && info.pid === child.pid && isPidAlive(info.pid)) return info;
    if (seen.exit) {
      const { code, signal } = seen.exit;
      if (/No module named '?qwenbook_bridge/.test(tailOfFile(log, 30) ?? "")) {
        throw new Error(`The worker's python ${python} (chosen from ${choice.reason}) has no qwenbook_bridge package. ${PYTHON_HINT}`);
      }
      throw new Error(
        `The qwenbook worker exited during start-up (${signal ? `signal ${signal}` : `exit code ${code}`}; python ${python}, from ${choice.reason}).` +
          quoteLog(),
      );
    }
    if (Date.now() > deadline) {
      throw new Error(
        `The qwenbook worker (pid ${child.pid}) did not write ${options.runtimeFile} within ${(timeoutMs / 1000).toFixed(1)} s; ` +
          `it is still running and may yet come up.${quoteLog()}`,
      );
    }
    await sleep(POLL_MS);
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
