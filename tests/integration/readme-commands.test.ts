// Every command the README shows, run the way a user types it after `npm start`: each line of the README's
// ```sh blocks goes through `sh -c` in the repository root, with a PATH that has neither .venv/bin nor any
// node_modules/.bin (a plain shell, not npm's), and is checked for what the README says it does. A command
// added to the README without a check here fails, and so does one that stopped working as written.
// The only rewrites: placeholders (<model>, <dir>, <adapter dir>) become real paths, `--port 8000` becomes a
// free port, so a busy 8000 on a shared machine cannot fail the run, and `npm start` gets
// `-- --no-browser --port <free>` (no browser to open here; the kernel default is read from the server instead).
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { isPidAlive } from "../../kernel/src/bridge/runtime";
import { freePort, shellCommands, userShellPath, withoutInstallSection } from "../readme-sections";
import { PythonLines, repo, tinyModel } from "./helpers";

/** The commands in the README's shell code blocks, in order, without trailing `# comments`. */
const readmeCommands = shellCommands;

/** Inline code in the README's prose that reads as a command (`npm …`, `npx …`, `python …`, `.venv/bin/…`). */
function inlineCommands(markdown: string): string[] {
  const prose = markdown.replace(/^```[\s\S]*?^```/gm, "");
  return [...prose.matchAll(/`((?:npm|npx|node|python3?|\.venv\/bin\/\S+|cd) [^`]+)`/g)].map((m) => m[1].trim());
}

// Shown in prose, not run here: each is a longer form of a command that is run below.
const NOT_RUN: Record<string, string> = {
  "npm run soak": "three minutes; `npm run soak -- --seconds 20` runs the same script",
  "npm run bench": "several minutes; `npm run bench -- --quick` runs the same script",
};

// The install section's commands run in tests/install/install.test.ts: from the checkout into a folder of their
// own, under a HOME of their own, in one shell.
const readme = withoutInstallSection(readFileSync(join(repo, "README.md"), "utf8"));
const scratch = mkdtempSync(join(tmpdir(), "qwenbook-readme-"));
const runtimeDir = join(scratch, "runtime");

const userPath = userShellPath();
const tinyModelOfSetup = join(repo, ".qwenbook", "models", "tiny-qwen2");

function userEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    // What npm, vitest and the test runner set for their children; a user's shell has none of it.
    if (/^(npm_|VITEST|QWENBOOK_|VIRTUAL_ENV$|NODE_ENV$|INIT_CWD$)/i.test(k)) continue;
    env[k] = v;
  }
  return {
    ...env,
    PATH: userPath,
    QWENBOOK_RUNTIME_DIR: runtimeDir, // a worker of this file's own, never another suite's or the user's
    JUPYTER_RUNTIME_DIR: join(scratch, "jupyter-runtime"),
    HF_HUB_OFFLINE: "1",
    // Were the checkout's bin ever missing, npx would fetch whatever the registry has under that name and run
    // it; refusing to install makes that a plain failure of the check instead.
    npm_config_yes: "false",
  };
}

interface Finished {
  status: number | null;
  out: string; // stdout and stderr together, as a terminal shows them
  stdout: string;
}

/** Runs the command to its end; past `timeoutMs` its whole process group is killed and the check fails. */
function typed(command: string, timeoutMs: number): Promise<Finished> {
  return new Promise((resolve, reject) => {
    const child = spawn("sh", ["-c", command], { cwd: repo, env: userEnv(), detached: true, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let stdout = "";
    child.stdout.on("data", (d: Buffer) => ((out += d.toString()), (stdout += d.toString())));
    child.stderr.on("data", (d: Buffer) => (out += d.toString()));
    const timer = setTimeout(() => {
      if (child.pid) process.kill(-child.pid, "SIGKILL");
      reject(new Error(`${command} did not finish in ${timeoutMs / 1000} s:\n${out}`));
    }, timeoutMs);
    child.on("error", (e) => (clearTimeout(timer), reject(e)));
    child.on("close", (status) => (clearTimeout(timer), resolve({ status, out, stdout })));
  });
}

/** A long-lived command (a server): started in its own process group, so stopping it stops all it started. */
class Running {
  readonly child: ChildProcess;
  out = "";
  exited: Promise<number | null>;
  constructor(readonly command: string) {
    this.child = spawn("sh", ["-c", command], { cwd: repo, env: userEnv(), detached: true, stdio: ["ignore", "pipe", "pipe"] });
    this.child.stdout?.on("data", (d: Buffer) => (this.out += d.toString()));
    this.child.stderr?.on("data", (d: Buffer) => (this.out += d.toString()));
    this.exited = new Promise((done) => this.child.on("exit", (code, signal) => done(code ?? (signal ? 128 : null))));
  }
  get alive(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }
  /** Polls `ready` until it returns a value; fails at once if the command exits first. */
  async waitFor<T>(what: string, ready: () => Promise<T | undefined>): Promise<T> {
    for (;;) {
      if (!this.alive) throw new Error(`${this.command} exited (${this.child.exitCode}) before ${what}:\n${this.out}`);
      const value = await ready().catch(() => undefined);
      if (value !== undefined) return value;
      await new Promise((r) => setTimeout(r, 250));
    }
  }
  async stop(): Promise<number | null> {
    if (this.alive && this.child.pid) process.kill(-this.child.pid, "SIGINT");
    return this.exited;
  }
  /** The last resort for afterAll: nothing of this command outlives the file. */
  kill(): void {
    if (this.alive && this.child.pid) {
      try {
        process.kill(-this.child.pid, "SIGKILL");
      } catch {
        // already gone
      }
    }
  }
}

const running: Running[] = [];

async function getJson(url: string, headers: Record<string, string> = {}): Promise<unknown> {
  const r = await fetch(url, { headers });
  if (!r.ok) return undefined;
  return r.json();
}

/** Polls until `url` stops answering (connection refused): the server let go of its port. */
async function portReleased(url: string): Promise<boolean> {
  for (;;) {
    try {
      await fetch(url);
    } catch {
      return true;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}

// ---------------------------------------------------------------- what each command must do

// The checks' own Python work (asking torch for CUDA devices, writing a LoRA adapter with peft, loading each
// `tiny-model` folder with transformers' Auto classes) goes through one Python process that imports torch,
// transformers and peft once: a fresh interpreter for each costs ~4 s of CPU in imports alone. Each request is
// a line of JSON (helpers.ts's PythonLines).
const CHECKER = `
import json, sys, traceback
import torch

def cuda(_):
    return {"devices": torch.cuda.device_count() if torch.cuda.is_available() else 0}

def adapter(req):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(req["model"])
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(m, cfg).save_pretrained(req["dir"])
    return {}

def load(req):
    # As a user would load a folder: transformers' Auto classes, then one forward pass.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(req["dir"])
    m = AutoModelForCausalLM.from_pretrained(req["dir"])
    ids = tok("你好", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        vocab = m(input_ids=ids).logits.shape[-1]
    return {"vocab": vocab, "model_type": m.config.model_type}

for line in sys.stdin:
    req = json.loads(line)
    try:
        reply = {"ok": {"cuda": cuda, "adapter": adapter, "load": load}[req["op"]](req)}
    except Exception:
        reply = {"error": traceback.format_exc()}
    print(json.dumps(reply), flush=True)
`;

let checkerProcess: PythonLines | undefined;
const checker = (): PythonLines => (checkerProcess ??= new PythonLines(["-c", CHECKER]));

let cudaDevices: number | undefined;
async function cudaCount(): Promise<number> {
  cudaDevices ??= (await checker().ask<{ devices: number }>({ op: "cuda" })).devices;
  return cudaDevices;
}

let adapterDir: string | undefined;
/** A LoRA adapter for the tiny model, written with plain peft (random non-zero weights), for `--adapter`. */
async function adapter(): Promise<string> {
  if (adapterDir) return adapterDir;
  const dir = join(scratch, "readme-adapter");
  await checker().ask({ op: "adapter", model: tinyModel(), dir });
  adapterDir = dir;
  return dir;
}

/** The command with its placeholders filled in; a placeholder not known here is an error. */
async function filled(command: string): Promise<string> {
  let out = command.replace(/--port 8000\b/, `--port ${await freePort()}`);
  out = out.replace(/<model>/g, tinyModel());
  out = out.replace(/<dir>/g, join(mkdtempSync(join(scratch, "dir-")), "out"));
  if (out.includes("<adapter dir>")) out = out.replace(/<adapter dir>/g, await adapter());
  const unknown = out.match(/<[a-z][^>]*>/i);
  if (unknown) throw new Error(`README command ${JSON.stringify(command)} has a placeholder ${unknown[0]} this test cannot fill`);
  return out;
}

async function workerRunning(): Promise<number | undefined> {
  const r = await typed("npx qwenbook worker status", 60_000);
  const m = r.stdout.match(/^worker pid (\d+)/m);
  return r.status === 0 && m ? Number(m[1]) : undefined;
}

async function checkGpuOnly(command: string): Promise<void> {
  const cleanup = ["qwenbook-bench.json", "qwenbook-quant-kernels.json", "qwenbook-chat-bench.json", "bench-dist.json", "serve.json"].filter(
    (f) => !existsSync(join(repo, f)),
  );
  try {
    const gpus = await cudaCount();
    const r = await typed(command, gpus > 0 ? 3_600_000 : 180_000);
    const refusal = r.out.match(/: needs (?:a CUDA GPU|(\d+) CUDA GPUs) \((?:none|\d+) found\)/);
    if (gpus === 0) {
      // No GPU: one clear line and status 1, not a traceback or a 7B model built on the CPU.
      expect(r.out.trim().split("\n"), r.out).toHaveLength(1);
      expect(refusal, r.out).not.toBeNull();
      expect(r.status).toBe(1);
    } else if (refusal) {
      expect(Number(refusal[1] ?? 1), `refused with ${gpus} GPUs:\n${r.out}`).toBeGreaterThan(gpus);
    } else {
      expect(r.status, r.out).toBe(0);
    }
  } finally {
    for (const f of cleanup) rmSync(join(repo, f), { force: true });
  }
}

interface Check {
  pattern: RegExp;
  timeoutMs: number;
  run(command: string): Promise<void>;
}

const CHECKS: Check[] = [
  {
    // `npm start` opens JupyterLab; run as a user does without a browser, on a free port, with the Qwen kernel
    // as the default that File › New › Notebook and the launcher pick.
    pattern: /^npm start$/,
    timeoutMs: 400_000,
    async run(command) {
      const port = await freePort();
      const lab = new Running(`${command} -- --no-browser --port ${port}`);
      running.push(lab);
      const token = await lab.waitFor("JupyterLab printed its URL", async () => lab.out.match(new RegExp(`127\\.0\\.0\\.1:${port}/lab\\?token=(\\w+)`))?.[1]);
      const specs = (await lab.waitFor("/api/kernelspecs answered", () =>
        getJson(`http://127.0.0.1:${port}/api/kernelspecs`, { Authorization: `token ${token}` }),
      )) as { default: string; kernelspecs: Record<string, { spec: { display_name: string } }> };
      expect(specs.default).toBe("qwen-ts");
      expect(specs.kernelspecs["qwen-ts"]?.spec.display_name).toBe("Qwen (TypeScript)");
      await lab.stop();
      expect(await portReleased(`http://127.0.0.1:${port}/api/status`)).toBe(true);
    },
  },
  {
    // `npm test` runs this very file; running it here would recurse. What can be checked is that it is wired
    // to the runner that includes this suite.
    pattern: /^npm test$/,
    timeoutMs: 10_000,
    async run() {
      const pkg = JSON.parse(readFileSync(join(repo, "package.json"), "utf8")) as { scripts: Record<string, string> };
      expect(pkg.scripts.test).toMatch(/node tests\/run-all\.mjs/);
      expect(readFileSync(join(repo, "tests", "run-all.mjs"), "utf8")).toContain('vitest("tests/vitest.config.ts"');
      expect(readFileSync(join(repo, "tests", "vitest.config.ts"), "utf8")).toContain('"tests/integration/**/*.test.ts"');
    },
  },
  {
    pattern: /^npx qwenbook (--help|-h|help)$/,
    timeoutMs: 60_000,
    async run(command) {
      const r = await typed(command, 60_000);
      expect(r.status, r.out).toBe(0);
      expect(r.stdout).toMatch(/^usage: qwenbook <command>/);
      expect(r.stdout).toContain("worker start");
    },
  },
  {
    pattern: /^npx qwenbook worker start( --transport (tcp|ipc))?$/,
    timeoutMs: 240_000,
    async run(command) {
      // From no worker, so that the command itself starts one (and with the transport it names).
      expect((await typed("npx qwenbook worker stop", 60_000)).status).toBe(0);
      const r = await typed(command, 170_000);
      expect(r.status, r.out).toBe(0);
      const started = r.stdout.match(/^Started the worker: pid (\d+) at (\w+):\/\//m);
      expect(started, r.out).not.toBeNull();
      expect(isPidAlive(Number(started?.[1])), r.out).toBe(true);
      expect(started?.[2]).toBe(command.match(/--transport (\w+)/)?.[1] ?? "ipc");
      expect(readdirSync(runtimeDir).length, "the runtime file is in QWENBOOK_RUNTIME_DIR").toBeGreaterThan(0);
    },
  },
  {
    pattern: /^npx qwenbook worker status$/,
    timeoutMs: 240_000,
    async run(command) {
      if ((await workerRunning()) === undefined) expect((await typed("npx qwenbook worker start", 170_000)).status).toBe(0);
      const r = await typed(command, 60_000);
      expect(r.status, r.out).toBe(0);
      expect(r.stdout).toMatch(/^worker pid \d+, up /m);
      expect(r.stdout).toMatch(/^models: none loaded$|^models:$/m);
      expect(r.stdout).toMatch(/^training runs(: none|:)$/m);
      expect(r.stdout).toMatch(/^OpenAI servers(: none|:)$/m);
    },
  },
  {
    pattern: /^npx qwenbook worker stop$/,
    timeoutMs: 240_000,
    async run(command) {
      if ((await workerRunning()) === undefined) expect((await typed("npx qwenbook worker start", 170_000)).status).toBe(0);
      const pid = await workerRunning();
      expect(pid).toBeDefined();
      const r = await typed(command, 60_000);
      expect(r.status, r.out).toBe(0);
      expect(r.stdout).toContain(`Stopped the worker (pid ${pid})`);
      expect(isPidAlive(pid as number)).toBe(false);
      const after = await typed("npx qwenbook worker status", 60_000);
      expect(after.status).toBe(1);
      expect(after.stdout).toMatch(/^No worker is running/);
    },
  },
  {
    pattern: /^npx qwenbook tiny-model <dir>( --arch (qwen3|qwen3-moe))?$/,
    timeoutMs: 180_000,
    async run(command) {
      const line = await filled(command);
      const arch = / --arch (\S+)$/.exec(line)?.[1];
      const dir = line.replace(/ --arch \S+$/, "").split(" ").pop() as string;
      const r = await typed(line, 170_000);
      expect(r.status, r.out).toBe(0);
      // Loadable as a user would load it: transformers' Auto classes, then one forward pass.
      const loaded = await checker().ask<{ vocab: number; model_type: string }>({ op: "load", dir });
      const modelType = { qwen3: "qwen3", "qwen3-moe": "qwen3_moe" }[arch ?? ""] ?? "qwen2";
      expect(loaded).toEqual({ vocab: 151936, model_type: modelType });
    },
  },
  {
    pattern: /^npx qwenbook serve --help$/,
    timeoutMs: 60_000,
    async run(command) {
      const r = await typed(command, 60_000);
      expect(r.status, r.out).toBe(0);
      expect(r.stdout).toMatch(/^usage: qwenbook serve <model>/);
    },
  },
  {
    // Serves until stopped: wait until /v1/models answers on the port, check the ids it lists and that the id the
    // "Serving NAME" line prints answers a chat (with one adapter: the adapter's id), then stop it.
    pattern: /^npx qwenbook serve <model> --port 8000( --adapter <adapter dir>| --adapter huanhuan=<adapter dir> --adapter zhenhuan=<adapter dir>)?$/,
    timeoutMs: 300_000,
    async run(command) {
      const line = await filled(command);
      const port = Number(line.match(/--port (\d+)/)?.[1]);
      const server = new Running(line);
      running.push(server);
      const models = (await server.waitFor(`/v1/models answered on port ${port}`, () =>
        getJson(`http://127.0.0.1:${port}/v1/models`),
      )) as { data: { id: string; parent?: string }[] };
      const ids = models.data.map((m) => m.id);
      // The base model under its folder's name, then each adapter: named, or after its folder ("readme-adapter").
      const adapters = command.includes("huanhuan=") ? ["huanhuan", "zhenhuan"] : command.includes("--adapter") ? ["readme-adapter"] : [];
      expect(ids).toEqual(["tiny-qwen2", ...adapters]);
      expect(models.data.slice(1).every((m) => m.parent === "tiny-qwen2")).toBe(true);
      const printed = (await server.waitFor("the Serving line", async () => server.out.match(/^Serving (\S+) at /m)?.[1]))!;
      expect(printed).toBe(adapters.length === 1 ? adapters[0] : "tiny-qwen2");
      const reply = await fetch(`http://127.0.0.1:${port}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: printed, messages: [{ role: "user", content: "Hello" }], max_tokens: 4, temperature: 0 }),
      });
      expect(reply.status).toBe(200);
      expect(((await reply.json()) as { model: string }).model).toBe(printed);
      // Stopped as a terminal's Ctrl-C would stop the group; the port must be free again.
      await server.stop();
      expect(await portReleased(`http://127.0.0.1:${port}/v1/models`)).toBe(true);
    },
  },
  {
    pattern: /^npm run soak -- --seconds \d+$/,
    timeoutMs: 600_000,
    async run(command) {
      const r = await typed(command, 590_000);
      expect(r.out).toMatch(/^soak: ok$/m);
      // On the model npm run soak's setup step keeps, not a throwaway one written for the run.
      expect(r.stdout).toContain(`"model": ${JSON.stringify(tinyModelOfSetup)}`);
      expect(r.status, r.out).toBe(0);
    },
  },
  {
    pattern: /^npm run bench -- --quick$/,
    timeoutMs: 600_000,
    async run(command) {
      const r = await typed(command, 590_000);
      expect(r.status, r.out).toBe(0);
      expect(r.stdout).toMatch(/^overhead: -?[\d.]+ ms per token/m);
      // The serving table's row for 4 streaming clients: tokens/s, first-token and inter-token times, 0 errors.
      expect(r.stdout).toMatch(/^\s+4(\s+[\d.]+){5}\s+0\s/m);
    },
  },
  {
    // GPU-only commands: without a GPU, a one-line refusal; with enough GPUs, a run to the end.
    pattern: /^\.venv\/bin\/python (-m (qwenbook_bridge\.bench(\.dist|\.chat|\.quant_kernels)?(\s|$)|pytest python-bridge\/tests_gpu$)|python-bridge\/tests\/bench\/serve_bench\.py .*--device cuda)/,
    timeoutMs: 3_700_000,
    run: checkGpuOnly,
  },
];

function checkFor(command: string): Check | undefined {
  return CHECKS.find((c) => c.pattern.test(command));
}

const commands = readmeCommands(readme);

describe("README commands, as typed in a shell after npm start", () => {
  beforeAll(() => {
    // The premise of the whole file: the shell these commands get is not one with the venv or npm's bins on PATH.
    const which = spawnSync("sh", ["-c", "command -v jupyter; command -v qwenbook; true"], { env: userEnv(), encoding: "utf8" });
    expect(which.stdout).not.toContain(join(repo, ".venv"));
    expect(which.stdout).not.toContain("node_modules");
  });

  afterAll(() => {
    checkerProcess?.close();
    for (const r of running) r.kill();
    const stop = spawnSync(process.execPath, [join(repo, "kernel", "bin", "qwenbook.js"), "worker", "stop"], { env: userEnv() });
    if (stop.status !== 0) console.error(`worker stop after the README commands: ${stop.stderr}`);
    rmSync(scratch, { recursive: true, force: true });
  });

  it("finds the README's commands, and each has a check here", () => {
    expect(commands.length).toBeGreaterThan(10);
    expect(commands.filter((c) => !checkFor(c)), "README commands with no check in readme-commands.test.ts").toEqual([]);
  });

  it("shows no command in prose that is neither run here nor a longer form of one that is", () => {
    const untested = inlineCommands(readme).filter((c) => !commands.includes(c) && !checkFor(c) && !(c in NOT_RUN));
    expect(untested).toEqual([]);
    for (const c of Object.keys(NOT_RUN)) expect(commands.some((run) => run.startsWith(`${c} -- `)), c).toBe(true);
  });

  for (const command of new Set([...commands, ...inlineCommands(readme).filter((c) => !(c in NOT_RUN) && !commands.includes(c))])) {
    const check = checkFor(command);
    it(command, () => {
      if (!check) throw new Error(`no check for README command ${JSON.stringify(command)}: add one to CHECKS`);
      return check.run(command);
    }, check?.timeoutMs);
  }
});

describe("the qwenbook launcher", () => {
  // In a fresh clone `npm ci` links the bin before anything is built: until `npm start` has run, the command
  // must say so rather than fail with a module-not-found stack.
  it("without a build, says to run npm start", async () => {
    const dir = mkdtempSync(join(tmpdir(), "qwenbook-unbuilt-"));
    try {
      mkdirSync(join(dir, "bin"));
      copyFileSync(join(repo, "kernel", "bin", "qwenbook.js"), join(dir, "bin", "qwenbook.js"));
      const r = await typed(`node ${join(dir, "bin", "qwenbook.js")} --help`, 60_000);
      expect(r.status).toBe(1);
      expect(r.out.trim().split("\n")).toHaveLength(1);
      expect(r.out).toMatch(/^qwenbook: the command is not built yet .*run `npm start`/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

interface LockEntry {
  version?: string;
  dependencies?: Record<string, string>;
  optionalDependencies?: Record<string, string>;
  [key: string]: unknown;
}

/**
 * A package-lock for a project that depends on the packed qwenbook at `tarball`: qwenbook's dependencies and
 * theirs, as the checkout's package-lock.json resolved them (found the way Node looks modules up: nested first).
 */
function lockFor(tarball: string): object {
  const packages = (JSON.parse(readFileSync(join(repo, "package-lock.json"), "utf8")) as { packages: Record<string, LockEntry> }).packages;
  const kernel = packages.kernel;
  const find = (from: string, name: string): string | undefined => {
    for (let at = from; ; at = at.includes("/node_modules/") ? at.slice(0, at.lastIndexOf("/node_modules/")) : "") {
      const path = at ? `${at}/node_modules/${name}` : `node_modules/${name}`;
      if (packages[path]) return path;
      if (!at) return undefined;
    }
  };
  const kept: Record<string, LockEntry> = {};
  const todo: [string, string][] = Object.keys(kernel.dependencies ?? {}).map((n) => ["", n]);
  while (todo.length) {
    const [from, name] = todo.pop()!;
    const path = find(from, name);
    if (!path || kept[path]) continue;
    kept[path] = packages[path];
    for (const dep of [...Object.keys(packages[path].dependencies ?? {}), ...Object.keys(packages[path].optionalDependencies ?? {})]) todo.push([path, dep]);
  }
  return {
    name: "uses-qwenbook",
    version: "1.0.0",
    lockfileVersion: 3,
    requires: true,
    packages: {
      "": { name: "uses-qwenbook", version: "1.0.0", dependencies: { qwenbook: tarball } },
      "node_modules/qwenbook": { version: kernel.version, resolved: tarball, dependencies: kernel.dependencies, bin: kernel.bin },
      ...kept,
    },
  };
}

describe("the qwenbook command from a packed tarball", () => {
  // Outside the checkout the bin must come with the package: the launcher is in the tarball, npm links it
  // at install time, and it runs the built CLI shipped beside it.
  it("npm install <tarball> links qwenbook, and npx qwenbook runs it", async () => {
    const dir = mkdtempSync(join(tmpdir(), "qwenbook-pack-"));
    try {
      const pack = await typed(`npm pack -w kernel --pack-destination ${dir} --json`, 120_000);
      expect(pack.status, pack.out).toBe(0);
      const [{ filename, files }] = JSON.parse(pack.stdout.slice(pack.stdout.indexOf("["))) as { filename: string; files: { path: string }[] }[];
      const bin = (JSON.parse(readFileSync(join(repo, "kernel", "package.json"), "utf8")) as { bin: Record<string, string> }).bin.qwenbook;
      expect(files.map((f) => f.path)).toContain(bin);
      const project = join(dir, "project");
      mkdirSync(project);
      const tarball = `file:${join(dir, filename)}`;
      writeFileSync(join(project, "package.json"), JSON.stringify({ name: "uses-qwenbook", version: "1.0.0", private: true, dependencies: { qwenbook: tarball } }));
      // --offline: the dependencies come from the cache `npm ci` filled, so the check needs no network. A lockfile
      // taken from the checkout's pins them, so npm needs only their cached tarballs, not registry metadata (which
      // an offline cache filled by `npm ci` may lack).
      writeFileSync(join(project, "package-lock.json"), JSON.stringify(lockFor(tarball)));
      const install = await typed(`cd ${project} && npm install --offline --no-audit --no-fund`, 240_000);
      expect(install.status, install.out).toBe(0);
      const help = await typed(`cd ${project} && npx qwenbook --help`, 60_000);
      expect(help.status, help.out).toBe(0);
      expect(help.stdout).toMatch(/^usage: qwenbook <command>/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 420_000);
});
