#!/usr/bin/env node
// After tsc: writes dist/index.mjs so `import { qwen } from "qwenbook"` works from Node ESM. It
// re-exports the CommonJS build (one module instance for both), naming each export explicitly
// because Node cannot always detect the names tsc's re-exports produce.
import { chmodSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const dist = join(dirname(fileURLToPath(import.meta.url)), "..", "dist");
const names = Object.keys(createRequire(import.meta.url)(join(dist, "index.js"))).filter((n) => n !== "__esModule").sort();
const lines = [
  "// Node ESM entry: re-exports the CommonJS build. Written by scripts/esm-wrapper.mjs.",
  'import cjs from "./index.js";',
  ...names.map((n) => `export const ${n} = cjs.${n};`),
  "export default cjs;",
  "",
];
writeFileSync(join(dist, "index.mjs"), lines.join("\n"));
writeFileSync(join(dist, "index.d.mts"), 'export * from "./index.js";\n');
// npm links the bin at install time, before a build; make sure the file it points to can run.
chmodSync(join(dist, "cli", "main.js"), 0o755);
console.log(`wrote dist/index.mjs (${names.length} exports)`);
