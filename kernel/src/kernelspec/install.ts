import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { join, resolve } from "node:path";
import { PYTHON_HINT, resolvePython, type PythonChoice } from "../bridge/paths";

export const KERNEL_NAME = "qwen-ts";
export const DISPLAY_NAME = "Qwen (TypeScript)";

type Env = Readonly<Record<string, string | undefined>>;

export interface KernelSpec {
  argv: string[];
  display_name: string;
  language: string;
  interrupt_mode: "signal";
  env?: Record<string, string>;
  metadata: Record<string, unknown>;
}

/**
 * kernel.json for this install: this Node and this package's launcher, by absolute path, and the worker's python
 * (as QWENBOOK_KERNEL_PYTHON, which QWENBOOK_PYTHON still overrides) when one is given.
 */
export function kernelSpec(
  nodePath: string = process.execPath,
  launchJs: string = join(__dirname, "launch.js"),
  python?: string,
): KernelSpec {
  return {
    argv: [nodePath, launchJs, "--config-path", "{connection_file}"],
    display_name: DISPLAY_NAME,
    language: "typescript",
    // The interrupt button must arrive as SIGINT: that is what the kernel turns into `cancel`.
    interrupt_mode: "signal",
    ...(python === undefined ? {} : { env: { QWENBOOK_KERNEL_PYTHON: python } }),
    metadata: { debugger: false },
  };
}

/** Jupyter's per-user data folder, as `jupyter --data-dir` finds it: $JUPYTER_DATA_DIR, else the platform's. */
export function jupyterDataDir(env: Env = process.env, platform: NodeJS.Platform = process.platform): string {
  if (env.JUPYTER_DATA_DIR) return resolve(env.JUPYTER_DATA_DIR);
  const home = env.HOME ?? homedir();
  if (platform === "darwin") return join(home, "Library", "Jupyter");
  return join(env.XDG_DATA_HOME || join(home, ".local", "share"), "jupyter");
}

export interface InstallResult {
  /** The kernelspec folder. */
  dir: string;
  /** False when an identical kernel.json was already there. */
  changed: boolean;
}

/**
 * Writes the kernelspec into `<prefix>/share/jupyter/kernels/qwen-ts/` (prefix: a virtualenv, as
 * `jupyter kernelspec install --sys-prefix` would), or without a prefix into the user's Jupyter data folder
 * (as `jupyter kernelspec install --user` would). Running it again changes nothing.
 */
export function installKernelspec(prefix: string | undefined, spec: KernelSpec = kernelSpec(), env: Env = process.env): InstallResult {
  let kernels: string;
  if (prefix === undefined) {
    kernels = join(jupyterDataDir(env), "kernels");
  } else {
    const root = resolve(prefix);
    if (!existsSync(root)) {
      throw new Error(`The prefix ${root} does not exist; pass the virtualenv Jupyter runs from (e.g. --prefix .venv)`);
    }
    kernels = join(root, "share", "jupyter", "kernels");
  }
  const dir = join(kernels, KERNEL_NAME);
  const file = join(dir, "kernel.json");
  const text = JSON.stringify(spec, null, 2) + "\n";
  if (existsSync(file) && readFileSync(file, "utf8") === text) return { dir, changed: false };
  mkdirSync(dir, { recursive: true });
  writeFileSync(file, text);
  return { dir, changed: true };
}

/**
 * The python the kernel's worker will run, checked to have qwenbook_bridge, as an absolute path: `--python`,
 * else $QWENBOOK_PYTHON, else the prefix's own python (the virtualenv Jupyter runs from), else the worker's usual
 * rule (resolvePython: the checkout's .venv, the active virtualenv, python3 on PATH).
 */
export function kernelPython(given: string | undefined, prefix: string | undefined, env: Env = process.env): string {
  let choice: PythonChoice;
  const inPrefix = prefix === undefined ? undefined : join(resolve(prefix), "bin", "python");
  if (given) choice = { command: given, reason: "--python" };
  else if (env.QWENBOOK_PYTHON) choice = { command: env.QWENBOOK_PYTHON, reason: "QWENBOOK_PYTHON" };
  else if (inPrefix && existsSync(inPrefix)) choice = { command: inPrefix, reason: "the --prefix virtualenv" };
  else choice = resolvePython(env);
  // find_spec, not an import: it finds the package without importing torch.
  const probe = "import importlib.util, sys\nif importlib.util.find_spec('qwenbook_bridge') is None: sys.exit(3)\nprint(sys.executable)";
  const r = spawnSync(choice.command, ["-c", probe], { encoding: "utf8", env: { ...env } });
  if (r.error) {
    throw new Error(`Could not run the worker's python ${choice.command} (chosen from ${choice.reason}): ${r.error.message}. ${PYTHON_HINT} Or pass --python.`);
  }
  if (r.status !== 0) {
    throw new Error(`The worker's python ${choice.command} (chosen from ${choice.reason}) has no qwenbook_bridge package. ${PYTHON_HINT} Or pass --python.`);
  }
  return r.stdout.trim();
}
