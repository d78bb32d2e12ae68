#!/usr/bin/env node
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { WorkerClient } from "../bridge/client";
import { PYTHON_HINT, resolvePython, tokenizerModelsDir } from "../bridge/paths";
import type { RunInfo } from "../bridge/protocol.gen";
import { readRunIndex, runIndexDir } from "../bridge/run-index";
import { endpoint, runtimeFilePath } from "../bridge/runtime";
import { ensureWorker, liveRuntime } from "../bridge/spawn";
import { stopWorker } from "../bridge/stop";
import { installKernelspec, kernelPython, kernelSpec, type KernelSpec } from "../kernelspec/install";
import { formatBytes } from "../api/progress";
import { serveCommand } from "./serve";

const USAGE = `usage: qwenbook <command>

  worker start [--device auto|cpu|cuda|cuda:N] [--transport ipc|tcp]
                                                 start the worker (or report the one running)
  worker status                                  show the worker's models, training runs and servers
  worker stop                                    stop the worker and unload its models
  serve <model> [--port N] [--api-key K] ...     serve a model as an OpenAI-compatible API (serve --help)
  tiny-model <dir> [--arch qwen2|qwen3|qwen3-moe]
                                                 write a tiny random test model into <dir> (default qwen2)
  kernelspec install [--prefix <venv>] [--python <python>]
                                                 install the "Qwen (TypeScript)" kernel into a venv, else into
                                                 the user's Jupyter folder ($JUPYTER_DATA_DIR); it records the
                                                 worker's python (--python, $QWENBOOK_PYTHON, the venv's python,
                                                 else as below), which must have qwenbook-bridge

The worker's runtime file: $QWENBOOK_RUNTIME_DIR, else $JUPYTER_RUNTIME_DIR, else
~/.local/share/jupyter/runtime. Its python: $QWENBOOK_PYTHON, else the python the kernelspec recorded, else the
checkout's .venv, else the active virtualenv's ($VIRTUAL_ENV), else python3 on PATH.
It listens on Unix sockets in a user-only folder there; on TCP 127.0.0.1 with --transport tcp or
QWENBOOK_TRANSPORT=tcp.
Exit codes: 0 done, 1 failed (or, for worker status, no worker running), 2 wrong command line.`;

/** A wrong command line: printed with the usage, exit code 2. */
class UsageError extends Error {}

function takeOption(args: string[], name: string): string | undefined {
  const i = args.findIndex((a) => a === name || a.startsWith(`${name}=`));
  if (i < 0) return undefined;
  const [flag] = args.splice(i, 1);
  if (flag.includes("=")) return flag.slice(name.length + 1);
  const value = args.splice(i, 1)[0];
  if (value === undefined || value.startsWith("--")) throw new UsageError(`${name} needs a value`);
  return value;
}

function noMoreArgs(args: string[]): void {
  if (args.length > 0) throw new UsageError(`unexpected argument ${JSON.stringify(args[0])}`);
}

async function workerStart(args: string[]): Promise<number> {
  const device = takeOption(args, "--device");
  const transport = takeOption(args, "--transport");
  noMoreArgs(args);
  if (device !== undefined && !/^(auto|cpu|cuda|cuda:\d+)$/.test(device)) {
    throw new UsageError(`--device must be auto, cpu, cuda or cuda:N, got ${JSON.stringify(device)}`);
  }
  if (transport !== undefined && transport !== "ipc" && transport !== "tcp") {
    throw new UsageError(`--transport must be ipc (Unix sockets, the default) or tcp, got ${JSON.stringify(transport)}`);
  }
  const runtimeFile = runtimeFilePath();
  const running = liveRuntime(runtimeFile);
  if (running) {
    console.log(`A worker is already running: pid ${running.pid} at ${endpoint(running, "router")} (log ${running.log})`);
    if (device) console.log(`(--device ${device} not applied; stop it first to start one on another device)`);
    if (transport && transport !== running.transport) console.log(`(--transport ${transport} not applied; stop it first to start one that listens on ${transport})`);
    return 0;
  }
  const info = await ensureWorker({ runtimeFile, device, transport });
  console.log(`Started the worker: pid ${info.pid} at ${endpoint(info, "router")}\n  runtime file ${runtimeFile}\n  log ${info.log}`);
  return 0;
}

async function workerStatus(args: string[]): Promise<number> {
  noMoreArgs(args);
  const runtimeFile = runtimeFilePath();
  const info = liveRuntime(runtimeFile);
  if (!info) {
    console.log(`No worker is running (runtime file ${runtimeFile}). Start one with: qwenbook worker start`);
    const runs = readRunIndex(dirname(runtimeFile));
    if (runs.length) console.log(`training runs (from the run index in ${runIndexDir(dirname(runtimeFile))}):`);
    for (const r of runs) console.log(runLine(r));
    return 1;
  }
  const client = await WorkerClient.connect(info, { clientName: "qwenbook status" });
  try {
    const s = await client.request("status", {});
    const h = client.hello;
    console.log(`worker pid ${s.pid}, up ${formatSeconds(s.uptime_s)}, protocol ${h.protocol_version}, worker ${h.worker_version}`);
    console.log(`  python ${h.python} (torch ${h.torch}, transformers ${h.transformers}), devices: ${h.devices.join(", ")}`);
    console.log(`  endpoint ${endpoint(info, "router")}, log ${info.log}`);
    console.log(s.models.length ? "models:" : "models: none loaded");
    for (const m of s.models) console.log(`  ${m.model_id}  ${m.architecture}  ${m.dtype} on ${m.device}  (${m.path})`);
    for (const mem of s.memory) {
      console.log(`memory ${mem.device}: ${formatBytes(mem.used)} used of ${formatBytes(mem.total)}`);
    }
    // Each paged engine's key/value cache (a chat engine per chatted-with model, one per server): often most of a GPU.
    const engines = s.engines ?? [];
    if (engines.length) console.log("key/value caches:");
    for (const e of engines) {
      const share = e.memory_utilization === undefined ? "" : `, ${Math.round(e.memory_utilization * 100)}% of free memory`;
      console.log(`  ${e.model_id} (${e.role}) on ${e.device}: ${e.blocks_used}/${e.blocks_total} blocks of ${e.block_size} tokens, ${formatBytes(e.cache_bytes)}${share}; ${e.running} running, ${e.waiting} waiting, prefix hits ${Math.round(e.prefix_hit_rate * 100)}%`);
    }
    if (s.running.length) console.log(`running: ${s.running.map((r) => `${r.msg_type} since ${r.started}`).join("; ")}`);
    const { runs } = await client.request("runs", {});
    console.log(runs.length ? "training runs:" : "training runs: none");
    for (const r of runs) console.log(runLine(r));
    const { servers } = await client.request("serve_status", {});
    console.log(servers.length ? "OpenAI servers:" : "OpenAI servers: none");
    for (const v of servers) console.log(`  ${v.url}  port ${v.port}  model ${v.model_id} (as "${v.name}")${v.auth ? "  API key required" : ""}`);
    return 0;
  } finally {
    client.close();
  }
}

async function workerStop(args: string[]): Promise<number> {
  noMoreArgs(args);
  const runtimeFile = runtimeFilePath();
  const info = liveRuntime(runtimeFile);
  if (!info) {
    console.log("No worker is running.");
    return 0;
  }
  await stopWorker(info, runtimeFile);
  console.log(`Stopped the worker (pid ${info.pid}).`);
  return 0;
}

/** The architectures `tiny-model --arch` builds; python-bridge/qwenbook_bridge/tiny.py has the same list. */
const TINY_ARCHS = ["qwen2", "qwen3", "qwen3-moe"] as const;

function tinyModel(args: string[]): number {
  const arch = takeOption(args, "--arch") ?? "qwen2";
  if (!(TINY_ARCHS as readonly string[]).includes(arch)) {
    throw new UsageError(`--arch must be one of ${TINY_ARCHS.join(", ")}, got ${JSON.stringify(arch)}`);
  }
  const [dir, ...rest] = args;
  if (!dir) throw new UsageError("tiny-model needs the folder to write the model into");
  noMoreArgs(rest);
  const python = resolvePython();
  const cmd = ["-m", "qwenbook_bridge.tiny", resolve(dir), "--arch", arch, "--tokenizer-dir", tokenizerModelsDir()];
  const r = spawnSync(python.command, cmd, { stdio: "inherit" });
  if (r.error) {
    throw new Error(`Could not run ${python.command} (from ${python.reason}): ${r.error.message}. ${PYTHON_HINT}`);
  }
  return r.status ?? 1;
}

function kernelspec(args: string[]): number {
  const [sub, ...rest] = args;
  if (sub !== "install") throw new UsageError(`kernelspec has one subcommand, install; got ${JSON.stringify(sub ?? "")}`);
  const prefix = takeOption(rest, "--prefix");
  const python = takeOption(rest, "--python");
  noMoreArgs(rest);
  const r = installKernelspec(prefix, kernelSpec(undefined, undefined, kernelPython(python, prefix)));
  const spec = JSON.parse(readFileSync(join(r.dir, "kernel.json"), "utf8")) as KernelSpec;
  const where = r.changed ? `Installed the "Qwen (TypeScript)" kernel in ${r.dir}` : `The "Qwen (TypeScript)" kernel is already installed in ${r.dir}`;
  console.log(`${where}\n  its worker's python: ${spec.env?.QWENBOOK_KERNEL_PYTHON}`);
  return 0;
}

async function run(argv: string[]): Promise<number> {
  const [command, ...args] = argv;
  if (command === undefined || command === "-h" || command === "--help" || command === "help") {
    console.log(USAGE);
    return command === undefined ? 2 : 0;
  }
  if (command === "worker") {
    const [sub, ...rest] = args;
    if (sub === "start") return workerStart(rest);
    if (sub === "status") return workerStatus(rest);
    if (sub === "stop") return workerStop(rest);
    throw new UsageError(`worker takes start, status or stop; got ${JSON.stringify(sub ?? "")}`);
  }
  if (command === "serve") return serveCommand(args);
  if (command === "tiny-model") return tinyModel(args);
  if (command === "kernelspec") return kernelspec(args);
  throw new UsageError(`unknown command ${JSON.stringify(command)}`);
}

/** One run of `worker status`: id, state, step, output folder and the checkpoint a resume would continue from. */
function runLine(r: RunInfo): string {
  const of = r.total_steps === undefined ? "" : `/${r.total_steps}`;
  const checkpoint = r.checkpoint === undefined ? "" : `  checkpoint ${r.checkpoint}`;
  return `  ${r.run_id.slice(0, 8)}  ${r.state.padEnd(11)}  step ${r.step}${of}  ${r.model_id}  ${r.output_dir}${checkpoint}`;
}

function formatSeconds(s: number): string {
  if (s < 120) return `${s.toFixed(0)} s`;
  if (s < 7200) return `${(s / 60).toFixed(0)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

run(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    if (e instanceof UsageError) {
      console.error(`qwenbook: ${e.message}\n\n${USAGE}`);
      process.exitCode = 2;
    } else {
      console.error(`qwenbook: ${e instanceof Error ? e.message : String(e)}`);
      process.exitCode = 1;
    }
  },
);
