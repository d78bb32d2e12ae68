#!/usr/bin/env node
// Installs the built labextension into a Python environment's share/jupyter/labextensions, where
// JupyterLab loads prebuilt extensions from without rebuilding itself.
//
//   node extension/scripts/install.mjs [VENV_PREFIX]     (default: $QWENBOOK_VENV, else <repo>/.venv)
//
// Idempotent: when the installed copy already matches the build, nothing is written.
import { cpSync, existsSync, mkdirSync, readFileSync, renameSync, rmSync } from "node:fs";
import { join } from "node:path";
import { LABEXTENSION_DIR, venvPrefix } from "./paths.mjs";
import { treeHash } from "./tree-hash.mjs";

const prefix = venvPrefix(process.argv[2]);
if (!existsSync(join(LABEXTENSION_DIR, "package.json"))) {
  console.error(`No built labextension at ${LABEXTENSION_DIR}: run \`npm run build -w extension\` first.`);
  process.exit(1);
}
if (!existsSync(prefix)) {
  console.error(`${prefix} does not exist: pass the prefix of a Python environment with JupyterLab installed.`);
  process.exit(1);
}
const { name } = JSON.parse(readFileSync(join(LABEXTENSION_DIR, "package.json"), "utf8"));
const parent = join(prefix, "share", "jupyter", "labextensions");
const target = join(parent, name);

if (existsSync(target) && treeHash([target], target) === treeHash([LABEXTENSION_DIR], LABEXTENSION_DIR)) {
  console.log(`${name} is already installed in ${target}`);
  process.exit(0);
}
// Copy beside the target and swap it in, so a JupyterLab starting meanwhile never sees half a copy.
mkdirSync(parent, { recursive: true });
const staging = `${target}.installing-${process.pid}`;
rmSync(staging, { recursive: true, force: true });
cpSync(LABEXTENSION_DIR, staging, { recursive: true });
rmSync(target, { recursive: true, force: true });
renameSync(staging, target);
console.log(`installed ${name} into ${target}`);
