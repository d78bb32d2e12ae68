#!/usr/bin/env node
// Builds the extension: TypeScript to lib/, then the prebuilt labextension to labextension/ with
// JupyterLab's builder (`jupyter-builder`, what `jupyter labextension build` now hands off to). The labextension step is skipped when its inputs have not changed.
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { PROTOCOL_PATH, SCHEMA_PATH, TYPES_PATH } from "./bundle-types.mjs";
import { EXTENSION_DIR, LABEXTENSION_DIR, requireJupyter, venvPrefix } from "./paths.mjs";
import { treeHash } from "./tree-hash.mjs";

const STAMP = join(EXTENSION_DIR, "lib", ".labextension-inputs");

function run(cmd, args, env = process.env) {
  const r = spawnSync(cmd, args, { cwd: EXTENSION_DIR, stdio: "inherit", env });
  if (r.status !== 0) {
    console.error(`extension build: \`${[cmd, ...args].join(" ")}\` failed (exit ${r.status ?? r.signal})`);
    process.exit(1);
  }
}

const started = Date.now();
// The types come from the shared schemas (the gauge's device is protocol.json's), made again when either is newer.
if (olderThan(TYPES_PATH, [SCHEMA_PATH, PROTOCOL_PATH, join(EXTENSION_DIR, "scripts", "bundle-types.mjs")])) {
  run(process.execPath, [join(EXTENSION_DIR, "scripts", "gen-types.mjs")]);
}
run(process.execPath, [require_("typescript/bin/tsc"), "-p", "tsconfig.json"]);

const inputs = treeHash(
  ["lib", "style", "package.json"].map((p) => join(EXTENSION_DIR, p)),
  EXTENSION_DIR,
);
const built = existsSync(join(LABEXTENSION_DIR, "package.json")) && existsSync(STAMP) && readFileSync(STAMP, "utf8") === inputs;
if (built) {
  console.log("labextension is up to date");
} else {
  const prefix = venvPrefix();
  requireJupyter(prefix);
  // `jupyter labextension build` hands off to the `jupyter-builder` command, found on PATH.
  const env = { ...process.env, PATH: `${join(prefix, "bin")}:${process.env.PATH ?? ""}` };
  // The builder runs `jlpm install` (Yarn) when the extension has no node_modules folder of its own,
  // and Yarn then replaces the workspace's npm-installed node_modules at the repository root. npm
  // hoists everything to the root, so an empty folder here is all it takes to keep Yarn out.
  mkdirSync(join(EXTENSION_DIR, "node_modules"), { recursive: true });
  run(join(prefix, "bin", "jupyter-builder"), ["build", "."], env);
  writeFileSync(STAMP, inputs);
}
console.log(`extension built in ${((Date.now() - started) / 1000).toFixed(1)} s`);

function olderThan(file, sources) {
  if (!existsSync(file)) return true;
  const t = statSync(file).mtimeMs;
  return sources.some((src) => statSync(src).mtimeMs > t);
}

function require_(spec) {
  // Resolve from this package, so the workspace's hoisted copy is found too.
  let dir = EXTENSION_DIR;
  for (;;) {
    const candidate = join(dir, "node_modules", spec);
    if (existsSync(candidate)) return candidate;
    const up = dirname(dir);
    if (up === dir) throw new Error(`${spec} is not installed: run npm install at the repository root`);
    dir = up;
  }
}
