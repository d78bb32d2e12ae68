#!/usr/bin/env node
// Opens JupyterLab on the tutorials with the venv's Jupyter, the Qwen kernel and the extension.
// Extra arguments go to `jupyter lab` (npm start -- --port 9999 --no-browser).
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const repo = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const venvBin = join(repo, ".venv", "bin");
const tiny = join(repo, ".qwenbook", "models", "tiny-qwen2");
const env = { ...process.env, PATH: `${venvBin}:${process.env.PATH}` };
if (!env.QWENBOOK_MODEL) {
  console.log("[start] notebooks use a locally cached Qwen model if you have one, else the tiny demo model:");
  console.log(`[start]   ${tiny}`);
  console.log("[start] set QWENBOOK_MODEL=<hub id or folder> to choose a model.");
}
// The Qwen kernel is the default (File › New › Notebook, the launcher's first pick, /api/kernelspecs'
// `default`) instead of the venv's Python kernel; given before the user's arguments, so theirs win.
const args = [
  "lab",
  `--notebook-dir=${join(repo, "notebooks")}`,
  "--ip=127.0.0.1",
  "--MappingKernelManager.default_kernel_name=qwen-ts",
  ...process.argv.slice(2),
];
// Jupyter refuses to start as root without this; containers and workshop machines often run as root.
if (process.getuid?.() === 0 && !args.includes("--allow-root")) args.push("--allow-root");
if (!existsSync(join(venvBin, "jupyter"))) {
  console.error("[start] .venv has no jupyter: run `npm start` again so setup can finish");
  process.exit(1);
}
const lab = spawn(join(venvBin, "jupyter"), args, { stdio: "inherit", env });
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => lab.kill(sig));
lab.on("exit", (code) => process.exit(code ?? 0));
