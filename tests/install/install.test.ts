// The README's "Install into your own environment" section, run as a user runs it: its commands exactly as written,
// one after another in one shell (so `cd` and `. .venv/bin/activate` carry over), starting in the checkout, with
// HOME in a fresh temporary folder (so `~/qwenbook-packages`, `~/my-notebooks`, the Jupyter data folder and every
// cache land there and the user's own folders are untouched) and a PATH with neither the checkout's .venv nor its
// node_modules. Python packages come from the pip index the user's pip settings name, npm packages from the npm
// registry (through the user's npm cache and settings, preferring what the cache has). Before the section's last command
// (`jupyter lab`, which serves until stopped) the shell also executes a small notebook with the new kernel: a chat
// and a short LoRA run on the tiny model. Each step is timed and the timings are printed.
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync } from "node:fs";
import { homedir, tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { INSTALL_HEADING, freePort, installSection, shellCommands, userShellPath } from "../readme-sections";

const repo = join(new URL(".", import.meta.url).pathname, "..", "..");
const readme = readFileSync(join(repo, "README.md"), "utf8");
const commands = shellCommands(installSection(readme));

const scratch = mkdtempSync(join(tmpdir(), "qwenbook-install-"));
const home = join(scratch, "home");
const runtimeDir = join(scratch, "runtime");
mkdirSync(home);

/** The folders the section's commands name, under the temporary HOME. */
const packages = join(home, "qwenbook-packages");
const project = join(home, "my-notebooks");

/** What the test runs in the same shell before `jupyter lab`: the notebook, then the worker it started. */
const notebookSteps = [
  `cp ${join(repo, "tests", "install", "install-check.ipynb")} .`,
  "jupyter nbconvert --to notebook --execute install-check.ipynb --output install-check.out.ipynb",
  "npx qwenbook worker status",
  "npx qwenbook worker stop",
];

const userPath = userShellPath();

function userEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    // What npm, vitest and the test runner set for their children, and where Jupyter and caches would otherwise
    // go: a user's shell has none of it, and nothing may reach the real folders.
    if (/^(npm_|VITEST|QWENBOOK_|JUPYTER_|VIRTUAL_ENV$|NODE_ENV$|INIT_CWD$|XDG_(DATA|CONFIG|CACHE|STATE)_HOME$|PYTHONPATH$)/i.test(k)) continue;
    env[k] = v;
  }
  const realNpmrc = join(homedir(), ".npmrc");
  // pip with the user's settings (its package index), which live under the real HOME.
  const realPipConf = [join(process.env.XDG_CONFIG_HOME ?? join(homedir(), ".config"), "pip", "pip.conf"), join(homedir(), ".pip", "pip.conf")].find(existsSync);
  return {
    ...env,
    ...(realPipConf && !env.PIP_CONFIG_FILE ? { PIP_CONFIG_FILE: realPipConf } : {}),
    PATH: userPath,
    HOME: home,
    QWENBOOK_RUNTIME_DIR: runtimeDir, // the worker the notebook starts is this file's own
    HF_HUB_OFFLINE: "1",
    // npm with the user's settings and package cache (read-mostly; the registry is asked only for what it lacks).
    npm_config_cache: process.env.npm_config_cache ?? join(homedir(), ".npm"),
    ...(existsSync(realNpmrc) ? { npm_config_userconfig: realNpmrc } : {}),
    npm_config_prefer_offline: "true",
    // Were the new project's bin ever missing, npx would fetch whatever the registry has under that name.
    npm_config_yes: "false",
  };
}

interface Step {
  command: string;
  /** From the README, or the test's own (the notebook). */
  fromReadme: boolean;
  out: string;
  started: number;
  /** Set when the next step starts (for `jupyter lab`: when it printed its URL). */
  seconds?: number;
}

const steps: Step[] = [];
let shell: ChildProcess | undefined;
let shellOut = "";
let shellExit: Promise<number | null> | undefined;
let labPort = 0;
const MARK = "@@qwenbook-install-step";

/** Each step's output and time: a marker line before each, noted with the time it arrives. */
function trackSteps(chunk: string, now: number): void {
  shellOut += chunk;
  for (;;) {
    const at = shellOut.indexOf(`${MARK} `);
    if (at < 0) break;
    const end = shellOut.indexOf("\n", at);
    if (end < 0) break;
    const index = Number(shellOut.slice(at + MARK.length + 1, end));
    const before = shellOut.slice(0, at);
    const last = steps.at(-1);
    if (last) {
      last.out += before;
      last.seconds = (now - last.started) / 1000;
    }
    if (index >= 0 && index < plan.length) steps.push({ ...plan[index], out: "", started: now });
    shellOut = shellOut.slice(end + 1);
  }
}

let plan: Pick<Step, "command" | "fromReadme">[] = [];

function runAll(): Promise<void> {
  const lab = commands.at(-1);
  if (lab !== "jupyter lab") throw new Error(`the README's ${INSTALL_HEADING} section must end with \`jupyter lab\`, got ${lab}`);
  plan = [
    ...commands.slice(0, -1).map((command) => ({ command, fromReadme: true })),
    ...notebookSteps.map((command) => ({ command, fromReadme: false })),
    { command: lab, fromReadme: true },
  ];
  // `jupyter lab` as typed, with only what a headless run needs: no browser, a free port, and (where the suite runs
  // as root, as in a container) --allow-root, without which Jupyter refuses to start.
  const root = process.getuid?.() === 0 ? " --allow-root" : "";
  const lines = plan.map((s, i) => `echo ${MARK} ${i}\n${s.command === lab ? `exec ${lab} --no-browser --port ${labPort}${root}` : s.command}`);
  const script = `set -e\n${lines.join("\n")}\n`;
  shell = spawn("sh", ["-c", script], { cwd: repo, env: userEnv(), detached: true, stdio: ["ignore", "pipe", "pipe"] });
  shell.stdout?.on("data", (d: Buffer) => trackSteps(d.toString(), Date.now()));
  shell.stderr?.on("data", (d: Buffer) => trackSteps(d.toString(), Date.now()));
  const child = shell;
  shellExit = new Promise((done) => child.on("exit", (code, signal) => done(code ?? (signal ? 128 : null))));
  return Promise.resolve();
}

const failedStep = (): string => {
  const last = steps.at(-1);
  return last ? `step \`${last.command}\` failed or did not finish:\n${last.out}${shellOut}` : `the shell ended before any step:\n${shellOut}`;
};

/** Polls until `ready` gives a value; fails as soon as the shell exits (a step failed). */
async function waitFor<T>(what: string, ready: () => Promise<T | undefined>): Promise<T> {
  let exited = false;
  void shellExit?.then(() => (exited = true));
  for (;;) {
    const value = await ready().catch(() => undefined);
    if (value !== undefined) return value;
    if (exited) throw new Error(`waiting for ${what}: the shell exited; ${failedStep()}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

const stepOut = (command: string): string => steps.find((s) => s.command === command)?.out ?? "";
const plain = (s: string): string => s.replace(/\x1b\[[0-9;]*m/g, "");

function streamLines(path: string): Record<string, unknown>[] {
  const nb = JSON.parse(readFileSync(path, "utf8")) as { cells: { outputs?: { output_type: string; text?: string | string[]; ename?: string; evalue?: string }[] }[] };
  const outputs = nb.cells.flatMap((c) => c.outputs ?? []);
  const errors = outputs.filter((o) => o.output_type === "error");
  if (errors.length) throw new Error(`the notebook had errors: ${errors.map((e) => `${e.ename}: ${e.evalue}`).join("; ")}`);
  const text = outputs.filter((o) => o.output_type === "stream").map((o) => (Array.isArray(o.text) ? o.text.join("") : o.text ?? "")).join("");
  return text.split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l) as Record<string, unknown>);
}

let labToken = "";

describe(`README: ${INSTALL_HEADING}`, () => {
  beforeAll(async () => {
    labPort = await freePort();
    await runAll();
    // Every step up to `jupyter lab` has run once the server prints its URL (with `set -e` a failed step ends it).
    labToken = await waitFor("JupyterLab to print its URL", async () => shellOut.match(new RegExp(`127\\.0\\.0\\.1:${labPort}/lab\\?token=(\\w+)`))?.[1]);
    const lab = steps.at(-1);
    if (lab) lab.seconds = (Date.now() - lab.started) / 1000;
  }, 1_500_000);

  afterAll(async () => {
    const cleanup = Date.now();
    if (shell?.pid && shell.exitCode === null && shell.signalCode === null) {
      process.kill(-shell.pid, "SIGTERM");
      const stopped = await Promise.race([shellExit, new Promise((r) => setTimeout(() => r("timeout"), 30_000))]);
      if (stopped === "timeout") process.kill(-shell.pid, "SIGKILL");
    }
    // The notebook's worker, if a step after it failed before `worker stop`: it lives in its own session.
    for (const f of existsSync(runtimeDir) ? readdirSync(runtimeDir).filter((n) => n.endsWith(".json")) : []) {
      try {
        const pid = (JSON.parse(readFileSync(join(runtimeDir, f), "utf8")) as { pid?: number }).pid;
        if (pid) process.kill(pid, "SIGKILL");
      } catch {
        // not a runtime file, or the worker is gone
      }
    }
    console.log(
      `install steps (seconds):\n${steps.map((s) => `${(s.seconds === undefined ? "-" : s.seconds.toFixed(1)).padStart(7)}  ${s.command}${s.fromReadme ? "" : "   (test)"}`).join("\n")}`,
    );
    const removing = Date.now();
    // About 1.5 GB (PyTorch in the new virtualenv): removed by a child process, so vitest's own messages keep flowing.
    await capture("rm", ["-rf", scratch]);
    const s = (from: number, to: number): string => ((to - from) / 1000).toFixed(1);
    console.log(`clean-up: JupyterLab and worker stopped in ${s(cleanup, removing)} s, the temporary folder removed in ${s(removing, Date.now())} s`);
  }, 300_000);

  it("the section has the commands a user runs, ending with jupyter lab", () => {
    expect(commands).toContain("npx qwenbook kernelspec install");
    expect(commands).toContain("jupyter labextension list");
    expect(commands.at(-1)).toBe("jupyter lab");
  });

  it("builds the npm tarball and both wheels, each with what it needs at run time and nothing else", async () => {
    const files = readdirSync(packages).sort();
    expect(files).toEqual(["qwenbook-0.1.0.tgz", "qwenbook_bridge-0.1.0-py3-none-any.whl", "qwenbook_extension-0.1.0-py3-none-any.whl"]);
    const tar = await capture("tar", ["-tzf", join(packages, "qwenbook-0.1.0.tgz")]);
    const inTar = tar.split("\n").filter(Boolean).map((p) => p.replace(/^package\//, ""));
    for (const needed of ["package.json", "README.md", "bin/qwenbook.js", "dist/index.js", "dist/index.mjs", "dist/cli/main.js", "dist/kernelspec/launch.js"]) {
      expect(inTar, needed).toContain(needed);
    }
    expect(inTar.filter((p) => !/^(package\.json|README\.md|bin\/qwenbook\.js|dist\/.+\.(js|mjs|d\.ts|d\.mts))$/.test(p))).toEqual([]);
    expect(inTar.filter((p) => /\.spec\.|testutil/.test(p))).toEqual([]);
    const bridge = (await capture("unzip", ["-Z1", join(packages, "qwenbook_bridge-0.1.0-py3-none-any.whl")])).split("\n");
    for (const needed of ["qwenbook_bridge/schema/protocol.json", "qwenbook_bridge/schema/bundles.json", "qwenbook_bridge/worker/process.py", "qwenbook_bridge/tiny.py"]) {
      expect(bridge, needed).toContain(needed);
    }
    expect(bridge.filter((p) => p.startsWith("tests") || p.includes("/tests/"))).toEqual([]);
    const ext = (await capture("unzip", ["-Z1", join(packages, "qwenbook_extension-0.1.0-py3-none-any.whl")])).split("\n").filter(Boolean);
    const data = "qwenbook_extension-0.1.0.data/data/share/jupyter/labextensions/qwenbook-extension/";
    expect(ext).toContain(`${data}package.json`);
    expect(ext).toContain(`${data}install.json`);
    expect(ext.some((p) => p.startsWith(`${data}static/remoteEntry.`))).toBe(true);
    expect(ext.filter((p) => !p.startsWith(data) && !p.startsWith("qwenbook_extension-0.1.0.dist-info/"))).toEqual([]);
  });

  it("registers the kernel in the Jupyter data folder under HOME, with the new virtualenv's python", () => {
    expect(stepOut("npx qwenbook kernelspec install")).toContain(join(home, ".local", "share", "jupyter", "kernels", "qwen-ts"));
    const spec = JSON.parse(readFileSync(join(home, ".local", "share", "jupyter", "kernels", "qwen-ts", "kernel.json"), "utf8")) as {
      argv: string[];
      env: Record<string, string>;
    };
    expect(spec.argv[1]).toBe(join(project, "node_modules", "qwenbook", "dist", "kernelspec", "launch.js"));
    expect(spec.env.QWENBOOK_KERNEL_PYTHON).toBe(join(project, ".venv", "bin", "python"));
  });

  it("jupyter labextension list shows the extension enabled, installed by pip", () => {
    const out = plain(stepOut("jupyter labextension list"));
    expect(out).toMatch(/qwenbook-extension v0\.1\.0 enabled OK \(python, qwenbook-extension\)/);
    expect(out).toContain(join(project, ".venv", "share", "jupyter", "labextensions"));
  });

  it("the notebook chats and trains a LoRA adapter through a worker on the new virtualenv's python", () => {
    const lines = streamLines(join(project, "install-check.out.ipynb"));
    const chat = lines.find((l) => "chat" in l) as { chat: string; tokens: number };
    expect(chat.tokens).toBeGreaterThan(0);
    expect(chat.tokens).toBeLessThanOrEqual(8);
    const train = lines.find((l) => "losses" in l) as { losses: number[]; adapter: string };
    expect(train.losses).toHaveLength(3);
    expect(train.losses.every((x) => Number.isFinite(x) && x > 0)).toBe(true);
    expect(train.adapter.startsWith(join(project, "runs", "install-check"))).toBe(true);
    expect(readdirSync(train.adapter)).toEqual(expect.arrayContaining(["adapter_config.json", "adapter_model.safetensors"]));
    const tuned = lines.find((l) => "tuned" in l) as { tuned: string; tokens: number };
    expect(tuned.tokens).toBeGreaterThan(0);
    // The worker the notebook started ran on the new virtualenv's python (the one the kernelspec recorded).
    expect(readFileSync(join(runtimeDir, "qwenbook-worker.log"), "utf8")).toContain(`starting: ${join(project, ".venv", "bin", "python")} -m qwenbook_bridge.worker`);
    expect(stepOut("npx qwenbook worker status")).toMatch(/^training runs:\n  \w+  completed    step 3\/3 /m);
  });

  it("jupyter lab serves the Qwen kernel and loads the extension", async () => {
    const auth = { Authorization: `token ${labToken}` };
    const specs = (await (await fetch(`http://127.0.0.1:${labPort}/api/kernelspecs`, { headers: auth })).json()) as {
      kernelspecs: Record<string, { spec: { display_name: string } }>;
    };
    expect(specs.kernelspecs["qwen-ts"]?.spec.display_name).toBe("Qwen (TypeScript)");
    const page = await (await fetch(`http://127.0.0.1:${labPort}/lab?token=${labToken}`)).text();
    const config = JSON.parse(page.match(/<script id="jupyter-config-data" type="application\/json">([\s\S]*?)<\/script>/)?.[1] ?? "{}") as {
      federated_extensions?: { name: string }[];
    };
    expect(config.federated_extensions?.map((e) => e.name)).toContain("qwenbook-extension");
  });
});

function capture(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr.on("data", (d: Buffer) => (err += d.toString()));
    child.on("error", reject);
    child.on("close", (status) => (status === 0 ? resolve(out) : reject(new Error(`${cmd} ${args.join(" ")}: exit ${status}: ${err}`))));
  });
}
