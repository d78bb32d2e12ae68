import { closeSync, existsSync, fstatSync, openSync, readFileSync, readSync, rmSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";

/** What every runtime file holds, whichever transport the worker listens on. */
interface RuntimeInfoCommon {
  /** Where requests go and where broadcasts come from (tcp://… or ipc://…); a worker before 0.2 wrote only ports. */
  router_endpoint?: string;
  pub_endpoint?: string;
  /** 64 hex characters; signs every message. */
  key: string;
  signature_scheme: "hmac-sha256";
  pid: number;
  protocol_version: string;
  worker_version: string;
  started: string;
  python: string;
  /** Where the worker logs; quoted in errors when it dies. */
  log: string;
}

/** Unix domain sockets in a user-only folder: the default on Linux and macOS. */
export interface IpcRuntimeInfo extends RuntimeInfoCommon {
  transport: "ipc";
  router_endpoint: string;
  pub_endpoint: string;
}

/** TCP ports on `ip`: only when asked for (`--transport tcp`, QWENBOOK_TRANSPORT=tcp), and on Windows. */
export interface TcpRuntimeInfo extends RuntimeInfoCommon {
  transport: "tcp";
  ip: string;
  router_port: number;
  pub_port: number;
}

/** What a running worker writes about itself, once its sockets are bound. */
export type RuntimeInfo = IpcRuntimeInfo | TcpRuntimeInfo;

/** How the worker is asked to listen: `transport` in spawn options, `--transport`, or $QWENBOOK_TRANSPORT. */
export type Transport = RuntimeInfo["transport"];

export const RUNTIME_FILE_NAME = "qwenbook-worker.json";

type Env = Readonly<Record<string, string | undefined>>;

/** The folder for the runtime file, log and spawn lock; the same rule the worker follows. */
export function runtimeDir(env: Env = process.env): string {
  if (env.QWENBOOK_RUNTIME_DIR) return env.QWENBOOK_RUNTIME_DIR;
  if (env.JUPYTER_RUNTIME_DIR) return env.JUPYTER_RUNTIME_DIR;
  return join(homedir(), ".local", "share", "jupyter", "runtime");
}

export function runtimeFilePath(env: Env = process.env): string {
  return join(runtimeDir(env), RUNTIME_FILE_NAME);
}

/** Reads the runtime file; null if there is none. A file that is there but unusable is an error. */
export function readRuntimeFile(path: string): RuntimeInfo | null {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw e;
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch {
    throw new Error(`The worker runtime file ${path} is not JSON. Stop the worker (npx qwenbook worker stop) or delete the file.`);
  }
  const problems = runtimeProblems(raw);
  if (problems.length > 0) {
    throw new Error(`The worker runtime file ${path} is not usable (${problems.join("; ")}). Delete it and start the worker again.`);
  }
  return raw as RuntimeInfo;
}

function runtimeProblems(raw: unknown): string[] {
  if (typeof raw !== "object" || raw === null) return ["not an object"];
  const r = raw as Record<string, unknown>;
  const out: string[] = [];
  if (r.transport !== "tcp" && r.transport !== "ipc") out.push(`transport ${JSON.stringify(r.transport)} is not supported (ipc or tcp)`);
  if (r.signature_scheme !== "hmac-sha256") out.push(`signature_scheme ${JSON.stringify(r.signature_scheme)} is not hmac-sha256`);
  const positive = r.transport === "tcp" ? ["router_port", "pub_port", "pid"] : ["pid"];
  for (const k of positive) {
    if (!Number.isInteger(r[k]) || (r[k] as number) <= 0) out.push(`${k} is not a positive integer`);
  }
  for (const k of r.transport === "tcp" ? ["ip", "key", "protocol_version"] : ["key", "protocol_version"]) {
    if (typeof r[k] !== "string" || r[k] === "") out.push(`${k} is missing`);
  }
  if (r.transport === "ipc") {
    for (const k of ["router_endpoint", "pub_endpoint"]) {
      if (typeof r[k] !== "string" || !(r[k] as string).startsWith("ipc://")) out.push(`${k} is not an ipc:// endpoint`);
    }
  }
  return out;
}

/** Removes a runtime file left by a worker that is gone, but only if it still names that pid. */
export function removeStaleRuntimeFile(path: string, pid: number): void {
  try {
    const current = JSON.parse(readFileSync(path, "utf8")) as { pid?: unknown };
    if (current.pid === pid) rmSync(path, { force: true });
  } catch {
    // Already gone or rewritten by a new worker: either way not ours to remove.
  }
}

/** The ZeroMQ address of the worker's request (router) or broadcast (pub) socket, by its transport. */
export function endpoint(info: RuntimeInfo, socket: "router" | "pub"): string {
  const recorded = socket === "router" ? info.router_endpoint : info.pub_endpoint;
  if (recorded !== undefined) return recorded;
  if (info.transport === "ipc") throw new Error(`the runtime file names no ${socket} endpoint`); // refused when read
  return `tcp://${info.ip}:${socket === "router" ? info.router_port : info.pub_port}`;
}

/**
 * True while `pid` is a running process. A zombie (exited, not yet reaped by its parent) counts
 * as dead: `kill(pid, 0)` still succeeds for it, which would make a crashed worker look alive.
 */
export function isPidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
  const stat = `/proc/${pid}/stat`;
  if (!existsSync(stat)) return true;
  try {
    const text = readFileSync(stat, "utf8");
    // The state letter follows the command name, which is in parentheses and may hold spaces.
    const state = text.slice(text.lastIndexOf(")") + 2, text.lastIndexOf(")") + 3);
    return state !== "Z" && state !== "X";
  } catch {
    return false;
  }
}

/** The last `lines` lines of a log file, for error messages; empty when it cannot be read. */
export function tailOfFile(path: string, lines = 20): string {
  let fd: number | undefined;
  try {
    fd = openSync(path, "r");
    const size = fstatSync(fd).size;
    // Logs grow for the worker's whole life; read only the end of it.
    const length = Math.min(size, 32 * 1024);
    const buf = Buffer.alloc(length);
    readSync(fd, buf, 0, length, size - length);
    return buf.toString("utf8").trimEnd().split("\n").slice(-lines).join("\n");
  } catch {
    return "";
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}
