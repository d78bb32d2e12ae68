import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = join(dirname(fileURLToPath(import.meta.url)), "..", "..");

export interface Lab {
  /** Base URL, e.g. http://127.0.0.1:8899 */
  url: string;
  token: string;
  /** The server's root folder; notebooks written here can be opened at /lab/tree/<name>. */
  root: string;
  /** Where the kernel's worker writes its runtime file. */
  runtimeDir: string;
  stop(): Promise<void>;
}

/** Picks a port that is free now (the OS chooses; the listener is closed again at once). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const addr = srv.address();
      srv.close(() => (typeof addr === "object" && addr ? resolve(addr.port) : reject(new Error("no port"))));
    });
  });
}

/**
 * Starts `jupyter lab` from the repository's venv on a free localhost port, with its own token, root
 * folder, config, data, runtime and settings folders, so nothing from the user's own Jupyter setup
 * leaks in. Prebuilt extensions and kernelspecs installed in the venv are still found: Jupyter
 * always searches the environment's share/jupyter.
 */
export async function startLab(venv = process.env.QWENBOOK_VENV ?? join(REPO, ".venv")): Promise<Lab> {
  const jupyter = join(venv, "bin", "jupyter");
  if (!existsSync(jupyter)) {
    throw new Error(`JupyterLab not found at ${jupyter}: run the setup first (npm test does), or set QWENBOOK_VENV.`);
  }
  const labext = join(venv, "share", "jupyter", "labextensions", "qwenbook-extension", "package.json");
  if (!existsSync(labext)) {
    throw new Error(`The Qwenbook labextension is not installed in ${venv}: run \`npm test\` (its setup builds the extension and pip installs it there).`);
  }
  const base = mkdtempSync(join(tmpdir(), "qwenbook-lab-"));
  const dirs = Object.fromEntries(
    ["root", "config", "data", "runtime", "settings", "workspaces", "worker"].map((d) => {
      const p = join(base, d);
      mkdirSync(p, { recursive: true });
      return [d, p];
    }),
  ) as Record<string, string>;
  // The "get notified about Jupyter news?" toast would sit over the widgets in screenshots.
  const notification = join(dirs.settings, "@jupyterlab", "apputils-extension");
  mkdirSync(notification, { recursive: true });
  writeFileSync(join(notification, "notification.jupyterlab-settings"), JSON.stringify({ fetchNews: "false" }));
  const port = await freePort();
  const token = randomBytes(24).toString("hex");
  const env = {
    ...process.env,
    PATH: `${join(venv, "bin")}:${process.env.PATH ?? ""}`,
    JUPYTER_CONFIG_DIR: dirs.config,
    JUPYTER_DATA_DIR: dirs.data,
    JUPYTER_RUNTIME_DIR: dirs.runtime,
    JUPYTERLAB_SETTINGS_DIR: dirs.settings,
    JUPYTERLAB_WORKSPACES_DIR: dirs.workspaces,
    QWENBOOK_RUNTIME_DIR: dirs.worker,
    QWENBOOK_TINY_MODEL: process.env.QWENBOOK_TINY_MODEL ?? join(REPO, ".qwenbook", "models", "tiny-qwen2"),
  };
  const args = [
    "lab",
    "--no-browser",
    "--ServerApp.ip=127.0.0.1",
    `--ServerApp.port=${port}`,
    "--ServerApp.port_retries=0",
    `--IdentityProvider.token=${token}`,
    `--ServerApp.root_dir=${dirs.root}`,
    // Offline: no update checks.
    "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    // CI containers often run as root, which Jupyter refuses without this.
    ...(process.getuid?.() === 0 ? ["--allow-root"] : []),
  ];
  const proc = spawn(jupyter, args, { env, stdio: ["ignore", "pipe", "pipe"] });
  let log = "";
  const keep = (chunk: Buffer) => {
    log = (log + chunk.toString()).slice(-20_000);
  };
  proc.stdout?.on("data", keep);
  proc.stderr?.on("data", keep);
  const url = `http://127.0.0.1:${port}`;
  try {
    await waitForServer(proc, `${url}/api/status?token=${token}`, () => log);
  } catch (e) {
    proc.kill("SIGTERM");
    rmSync(base, { recursive: true, force: true });
    throw e;
  }
  return {
    url,
    token,
    root: dirs.root,
    runtimeDir: dirs.worker,
    async stop() {
      await stopProcess(proc);
      stopWorker(dirs.worker);
      rmSync(base, { recursive: true, force: true });
    },
  };
}

async function waitForServer(proc: ChildProcess, statusUrl: string, log: () => string): Promise<void> {
  const deadline = Date.now() + 90_000;
  while (Date.now() < deadline) {
    if (proc.exitCode !== null) {
      throw new Error(`jupyter lab exited with code ${proc.exitCode} before it was ready:\n${log()}`);
    }
    try {
      const r = await fetch(statusUrl);
      if (r.ok) return;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`jupyter lab did not answer ${statusUrl.replace(/token=\w+/, "token=…")} within 90 s:\n${log()}`);
}

function stopProcess(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => proc.kill("SIGKILL"), 10_000);
    proc.once("exit", () => {
      clearTimeout(timer);
      resolve();
    });
    proc.kill("SIGTERM");
  });
}

/** The kernel starts the worker detached so it outlives kernels; the test run's own worker must go. */
function stopWorker(runtimeDir: string): void {
  const file = join(runtimeDir, "qwenbook-worker.json");
  if (!existsSync(file)) return;
  try {
    const { pid } = JSON.parse(readFileSync(file, "utf8")) as { pid?: number };
    if (typeof pid === "number" && pid > 0) process.kill(pid, "SIGTERM");
  } catch {
    // already gone
  }
}
