// Once per vitest run: make sure kernel/dist matches kernel/src (the integration tests run the
// built package the way a notebook or script loads it), and find or build the tiny model.
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestProject } from "vitest/node";

const repo = join(new URL(".", import.meta.url).pathname, "..", "..");
const kernel = join(repo, "kernel");

declare module "vitest" {
  export interface ProvidedContext {
    tinyModel: string;
    tinyQwen3Model: string;
  }
}

function newestMtime(path: string): number {
  const st = statSync(path);
  if (!st.isDirectory()) return st.mtimeMs;
  // Specs and their fixtures are not part of the build.
  const names = readdirSync(path).filter((n) => !n.endsWith(".spec.ts") && n !== "testutil.ts");
  return Math.max(0, ...names.map((n) => newestMtime(join(path, n))));
}

function buildKernelIfStale(): void {
  const built = join(kernel, "dist", "index.mjs");
  const sources = Math.max(newestMtime(join(kernel, "src")), newestMtime(join(kernel, "tsconfig.json")), newestMtime(join(kernel, "scripts")));
  if (existsSync(built) && statSync(built).mtimeMs >= sources) return;
  const r = spawnSync("npm", ["run", "build", "-w", "kernel"], { cwd: repo, stdio: "inherit" });
  if (r.status !== 0) throw new Error("npm run build -w kernel failed; the integration tests need kernel/dist");
}

export default function setup(project: TestProject): () => void {
  buildKernelIfStale();
  let made: string | null = null;
  let tiny = process.env.QWENBOOK_TINY_MODEL;
  if (!tiny) {
    made = mkdtempSync(join(tmpdir(), "qwenbook-tiny-"));
    tiny = join(made, "tiny-qwen2");
    const r = spawnSync(process.execPath, [join(kernel, "dist", "cli", "main.js"), "tiny-model", tiny], { stdio: "inherit" });
    if (r.status !== 0) throw new Error(`qwenbook tiny-model ${tiny} failed (exit ${r.status})`);
  }
  project.provide("tinyModel", tiny);
  let tinyQwen3 = process.env.QWENBOOK_TINY_QWEN3;
  if (!tinyQwen3) {
    made ??= mkdtempSync(join(tmpdir(), "qwenbook-tiny-"));
    tinyQwen3 = join(made, "tiny-qwen3");
    const r = spawnSync(process.execPath, [join(kernel, "dist", "cli", "main.js"), "tiny-model", tinyQwen3, "--arch", "qwen3"], { stdio: "inherit" });
    if (r.status !== 0) throw new Error(`qwenbook tiny-model ${tinyQwen3} --arch qwen3 failed (exit ${r.status})`);
  }
  project.provide("tinyQwen3Model", tinyQwen3);
  return () => {
    if (made) rmSync(made, { recursive: true, force: true });
  };
}
