// `qwenbook serve <model>`: an OpenAI-compatible server without a notebook. The Python side
// (qwenbook_bridge.openai.cli) loads the model and serves; this checks the command line first, so a
// typo fails in a second instead of after the model has loaded, then runs it and passes signals on.
import { spawn } from "node:child_process";
import { existsSync, statSync } from "node:fs";
import { constants } from "node:os";
import { basename, join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { PYTHON_HINT, resolvePython } from "../bridge/paths";

export const SERVE_USAGE = `usage: qwenbook serve <model> [options]

  <model>                 hub id (e.g. Qwen/Qwen2.5-7B-Instruct) or local model folder
  --port N                port to listen on (default 8000; 0 picks a free one)
  --host H                address to bind (default 127.0.0.1, this machine only; 0.0.0.0 every interface)
  --api-key K             require "Authorization: Bearer K" on every request
  --name N                model id clients use for the base model (default: the hub id or the folder's name)
  --adapter NAME=DIR      serve the LoRA adapter in DIR as model NAME beside the base model (repeatable:
                          every adapter decodes in the same batch); DIR alone serves it as the folder's name.
                          With one adapter, "Serving NAME" names the adapter: ask for that id to get its output
  --lora-modules NAME=DIR ...
                          vLLM's spelling of --adapter: one or more adapters after one flag; each may also be
                          vLLM's JSON '{"name": NAME, "path": DIR}'
  --device D              auto, cpu, cuda or cuda:N (default auto)
  --dtype T               auto, bf16, fp16 or fp32 (default auto)
  --max-batch-size N      requests decoded together (default 32)
  --context-length N      tokens per request, prompt included (default: the model's own)
  --memory-utilization F  share of the device's memory the model and its key/value cache may use, in (0, 1]
                          (default 0.9)
  --max-queue N           requests that may wait for a place in the batch; more get 429 with Retry-After
                          (default: 4 per batch row)
  --max-body SIZE         largest request body, in bytes or with KiB/MiB/GiB, e.g. 8MiB; larger ones get 413
                          (default 4MiB)
  --retry-after S         Retry-After seconds on a 429 (default: estimated from recent request times)
  --client-timeout S      seconds a client may take to send its request or leave a stream unread before it is
                          disconnected (default 30)

Serves until Ctrl-C or SIGTERM, then frees the port and exits 0.`;

class ServeUsageError extends Error {}

/** The python command line for serve_cli, or a ServeUsageError naming what is wrong. */
export function serveArgs(argv: string[]): string[] {
  let parsed;
  try {
    parsed = parseArgs({
      args: loraModules(argv),
      allowPositionals: true,
      strict: true,
      options: {
        port: { type: "string" },
        host: { type: "string" },
        "api-key": { type: "string" },
        name: { type: "string" },
        adapter: { type: "string", multiple: true },
        device: { type: "string" },
        dtype: { type: "string" },
        "max-batch-size": { type: "string" },
        "context-length": { type: "string" },
        "memory-utilization": { type: "string" },
        "max-queue": { type: "string" },
        "max-body": { type: "string" },
        "retry-after": { type: "string" },
        "client-timeout": { type: "string" },
      },
    });
  } catch (e) {
    throw new ServeUsageError((e as Error).message);
  }
  const { values: v, positionals } = parsed;
  if (positionals.length === 0) throw new ServeUsageError("serve needs the model to serve: a hub id or a model folder");
  if (positionals.length > 1) throw new ServeUsageError(`serve takes one model, got ${positionals.map((p) => JSON.stringify(p)).join(", ")}`);
  const out = ["-m", "qwenbook_bridge.openai.cli", positionals[0]];
  if (v.port !== undefined) out.push("--port", String(integer("--port", v.port, 0, 65535)));
  if (v.host !== undefined) out.push("--host", word("--host", v.host));
  if (v["api-key"] !== undefined) out.push("--api-key", word("--api-key", v["api-key"]));
  if (v.name !== undefined) {
    if (v.name.trim() === "") throw new ServeUsageError("--name must not be empty");
    out.push("--name", v.name);
  }
  const adapters = new Map<string, string>();
  for (const text of v.adapter ?? []) {
    const [name, dir] = adapterOption(text);
    const before = adapters.get(name);
    if (before !== undefined) throw new ServeUsageError(`--adapter names ${JSON.stringify(name)} twice (${before} and ${dir}): give each adapter its own name with NAME=DIR`);
    if (name === v.name) throw new ServeUsageError(`--adapter ${text}: ${JSON.stringify(name)} is already the base model's name (--name); give the adapter another name`);
    adapters.set(name, dir);
    out.push("--adapter", `${name}=${dir}`);
  }
  if (v.device !== undefined) {
    if (!/^(auto|cpu|cuda|cuda:\d+)$/.test(v.device)) throw new ServeUsageError(`--device must be auto, cpu, cuda or cuda:N, got ${JSON.stringify(v.device)}`);
    out.push("--device", v.device);
  }
  if (v.dtype !== undefined) {
    if (!["auto", "bf16", "fp16", "fp32"].includes(v.dtype)) throw new ServeUsageError(`--dtype must be auto, bf16, fp16 or fp32, got ${JSON.stringify(v.dtype)}`);
    out.push("--dtype", v.dtype);
  }
  if (v["max-batch-size"] !== undefined) out.push("--max-batch-size", String(integer("--max-batch-size", v["max-batch-size"], 1, 1024)));
  if (v["context-length"] !== undefined) out.push("--context-length", String(integer("--context-length", v["context-length"], 2, 10_000_000)));
  if (v["memory-utilization"] !== undefined) out.push("--memory-utilization", String(fraction("--memory-utilization", v["memory-utilization"])));
  if (v["max-queue"] !== undefined) out.push("--max-queue", String(integer("--max-queue", v["max-queue"], 0, 1_000_000)));
  if (v["max-body"] !== undefined) out.push("--max-body", String(byteSize("--max-body", v["max-body"])));
  if (v["retry-after"] !== undefined) out.push("--retry-after", String(integer("--retry-after", v["retry-after"], 1, 3600)));
  if (v["client-timeout"] !== undefined) out.push("--client-timeout", String(seconds("--client-timeout", v["client-timeout"], 0.1, 3600)));
  return out;
}

const SIZE_UNITS: Record<string, number> = {
  "": 1, b: 1, k: 1024, kb: 1000, kib: 1024, m: 1024 ** 2, mb: 1000 ** 2, mib: 1024 ** 2, g: 1024 ** 3, gb: 1000 ** 3, gib: 1024 ** 3,
};
const MIN_BODY = 1024;
const MAX_BODY = 1024 ** 3;

/** "4194304", "4MiB", "512k" or "8 MB" as bytes (k/M/G alone are binary, as in curl and nginx). */
function byteSize(flag: string, text: string): number {
  const m = /^\s*(\d+)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = m ? SIZE_UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || unit === undefined) {
    throw new ServeUsageError(`${flag} must be a size in bytes or with KiB, MiB or GiB (e.g. 8MiB), got ${JSON.stringify(text)}`);
  }
  const n = Number(m[1]) * unit;
  if (!Number.isSafeInteger(n) || n < MIN_BODY || n > MAX_BODY) {
    throw new ServeUsageError(`${flag} must be from 1KiB to 1GiB, got ${JSON.stringify(text)}`);
  }
  return n;
}

function seconds(flag: string, text: string, min: number, max: number): number {
  const n = /^\d+(\.\d+)?$/.test(text) ? Number(text) : NaN;
  if (!Number.isFinite(n) || n < min || n > max) {
    throw new ServeUsageError(`${flag} must be a number of seconds from ${min} to ${max}, got ${JSON.stringify(text)}`);
  }
  return n;
}

function integer(flag: string, text: string, min: number, max: number): number {
  const n = /^\d+$/.test(text) ? Number(text) : NaN;
  if (!Number.isSafeInteger(n) || n < min || n > max) {
    throw new ServeUsageError(`${flag} must be a whole number from ${min} to ${max}, got ${JSON.stringify(text)}`);
  }
  return n;
}

function word(flag: string, text: string): string {
  if (text === "" || /\s/.test(text)) throw new ServeUsageError(`${flag} must be non-empty without spaces, got ${JSON.stringify(text)}`);
  return text;
}

/** vLLM's `--lora-modules A B ...` (the values up to the next option) as `--adapter A --adapter B ...`. */
function loraModules(argv: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg.startsWith("--lora-modules=")) {
      out.push("--adapter", arg.slice("--lora-modules=".length));
    } else if (arg === "--lora-modules") {
      let n = 0;
      while (i + 1 < argv.length && !argv[i + 1]!.startsWith("-")) {
        out.push("--adapter", argv[++i]!);
        n++;
      }
      if (n === 0) throw new ServeUsageError("--lora-modules needs one or more NAME=DIR after it");
    } else {
      out.push(arg);
    }
  }
  return out;
}

function fraction(flag: string, text: string): number {
  const n = /^(\d+(\.\d*)?|\.\d+)$/.test(text) ? Number(text) : NaN;
  if (!(n > 0 && n <= 1)) throw new ServeUsageError(`${flag} must be a fraction in (0, 1], e.g. 0.9, got ${JSON.stringify(text)}`);
  return n;
}

/**
 * `--adapter NAME=DIR` or `--adapter DIR` as [name, absolute folder], the folder checked to be an adapter's.
 * A value that is an existing folder is a DIR even if it holds "=" (the same rule as the Python side).
 */
function adapterOption(text: string): [string, string] {
  if (text.trimStart().startsWith("{")) return adapterJson(text);
  const cut = text.indexOf("=");
  const bare = cut < 0 || isDir(resolve(text));
  const name = bare ? basename(resolve(text)) : text.slice(0, cut);
  const path = bare ? text : text.slice(cut + 1);
  if (name === "" || name.trim() !== name) throw new ServeUsageError(`--adapter ${text}: no adapter name; write NAME=DIR, e.g. huanhuan=./out/adapter`);
  if (path === "") throw new ServeUsageError(`--adapter ${text}: no adapter folder; write NAME=DIR, e.g. ${name}=./out/adapter`);
  return [name, adapterDir(text, path)];
}

/** `path` made absolute, after checking it is an adapter folder; `text` is the option as given, for errors. */
function adapterDir(text: string, path: string): string {
  const dir = resolve(path);
  if (!isDir(dir)) throw new ServeUsageError(`--adapter ${text}: no such folder ${path}`);
  if (!existsSync(join(dir, "adapter_config.json"))) {
    throw new ServeUsageError(`--adapter ${text}: ${path} is not a LoRA adapter folder (it has no adapter_config.json); pass the folder training wrote`);
  }
  return dir;
}

/** vLLM's JSON form of an adapter, '{"name": NAME, "path": DIR}' (other fields, such as base_model_name, ignored). */
function adapterJson(text: string): [string, string] {
  let spec: unknown;
  try {
    spec = JSON.parse(text);
  } catch (e) {
    throw new ServeUsageError(`--adapter ${text}: not valid JSON (${(e as Error).message}); write NAME=DIR or '{"name": NAME, "path": DIR}'`);
  }
  const { name, path } = (spec ?? {}) as { name?: unknown; path?: unknown };
  if (typeof name !== "string" || typeof path !== "string" || name === "" || name.trim() !== name || path === "") {
    throw new ServeUsageError(`--adapter ${text}: needs a non-empty "name" and "path", e.g. '{"name": "huanhuan", "path": "./out/adapter"}'`);
  }
  return [name, adapterDir(text, path)];
}

function isDir(path: string): boolean {
  return existsSync(path) && statSync(path).isDirectory();
}

/** Runs `qwenbook serve ...`; resolves with the exit code. */
export async function serveCommand(argv: string[]): Promise<number> {
  if (argv.includes("-h") || argv.includes("--help")) {
    console.log(SERVE_USAGE);
    return 0;
  }
  let args: string[];
  try {
    args = serveArgs(argv);
  } catch (e) {
    if (!(e instanceof ServeUsageError)) throw e;
    console.error(`qwenbook serve: ${e.message}\n\n${SERVE_USAGE}`);
    return 2;
  }
  const python = resolvePython();
  const child = spawn(python.command, args, { stdio: "inherit", env: { ...process.env, PYTHONUNBUFFERED: "1" } });
  // Ctrl-C in a terminal reaches the whole process group, the child included; a SIGTERM from a
  // process manager reaches only us. Passing both on lets the server close its port either way.
  const forward = (signal: NodeJS.Signals) => () => void child.kill(signal);
  const onInt = forward("SIGINT");
  const onTerm = forward("SIGTERM");
  process.on("SIGINT", onInt);
  process.on("SIGTERM", onTerm);
  try {
    return await new Promise<number>((resolveCode, reject) => {
      child.once("error", (e) =>
        reject(new Error(`Could not run ${python.command} (from ${python.reason}): ${e.message}. ${PYTHON_HINT}`)),
      );
      child.once("exit", (code, signal) => resolveCode(code ?? 128 + (signal ? constants.signals[signal] : 1)));
    });
  } finally {
    process.off("SIGINT", onInt);
    process.off("SIGTERM", onTerm);
  }
}
