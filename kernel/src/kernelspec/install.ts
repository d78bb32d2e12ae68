import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";

export const KERNEL_NAME = "qwen-ts";
export const DISPLAY_NAME = "Qwen (TypeScript)";

export interface KernelSpec {
  argv: string[];
  display_name: string;
  language: string;
  interrupt_mode: "signal";
  metadata: Record<string, unknown>;
}

/** kernel.json for this install: this Node and this package's launcher, by absolute path. */
export function kernelSpec(nodePath: string = process.execPath, launchJs: string = join(__dirname, "launch.js")): KernelSpec {
  return {
    argv: [nodePath, launchJs, "--config-path", "{connection_file}"],
    display_name: DISPLAY_NAME,
    language: "typescript",
    // The interrupt button must arrive as SIGINT: that is what the kernel turns into `cancel`.
    interrupt_mode: "signal",
    metadata: { debugger: false },
  };
}

export interface InstallResult {
  /** The kernelspec folder. */
  dir: string;
  /** False when an identical kernel.json was already there. */
  changed: boolean;
}

/**
 * Writes the kernelspec into `<prefix>/share/jupyter/kernels/qwen-ts/` (prefix: a virtualenv, as
 * `jupyter kernelspec install --sys-prefix` would). Running it again changes nothing.
 */
export function installKernelspec(prefix: string, spec: KernelSpec = kernelSpec()): InstallResult {
  const root = resolve(prefix);
  if (!existsSync(root)) {
    throw new Error(`The prefix ${root} does not exist; pass the virtualenv Jupyter runs from (e.g. --prefix .venv)`);
  }
  const dir = join(root, "share", "jupyter", "kernels", KERNEL_NAME);
  const file = join(dir, "kernel.json");
  const text = JSON.stringify(spec, null, 2) + "\n";
  if (existsSync(file) && readFileSync(file, "utf8") === text) return { dir, changed: false };
  mkdirSync(dir, { recursive: true });
  writeFileSync(file, text);
  return { dir, changed: true };
}
