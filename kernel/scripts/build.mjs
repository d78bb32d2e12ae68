#!/usr/bin/env node
// Compiles the package with the project's TypeScript. `tsc` on PATH is not reliable here: tslab's
// own TypeScript (5.0) also installs a `tsc` bin and may win the node_modules/.bin link.
// `--check` type-checks the sources and the specs without writing anything.
import { spawnSync } from "node:child_process";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const kernel = join(dirname(fileURLToPath(import.meta.url)), "..");
const tsc = createRequire(join(kernel, "package.json")).resolve("typescript/bin/tsc");

function run(...args) {
  const r = spawnSync(process.execPath, [tsc, ...args], { cwd: kernel, stdio: "inherit" });
  if (r.status !== 0) process.exit(r.status ?? 1);
}

if (process.argv.includes("--check")) {
  run("-p", "tsconfig.json", "--noEmit");
  run("-p", "tsconfig.spec.json");
} else {
  // The contracts' types come from the schemas in python-bridge/qwenbook_bridge/schema: make them again
  // first, so a schema edit reaches the build (the specs fail while the committed files lag behind).
  const { regenerate } = await import("./gen-protocol.mjs");
  for (const path of regenerate()) console.log(`regenerated ${path} from its schema`);
  run("-p", "tsconfig.json");
  await import("./esm-wrapper.mjs");
}
