#!/usr/bin/env node
// Notebooks are committed without outputs. `node tests/notebooks/strip.mjs` strips them in place;
// `--check` only reports the ones that still carry outputs (the notebook suite runs it).
import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const dir = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "notebooks");

/** Returns the notebook without outputs, execution counts or run-time metadata, and whether it changed. */
export function strip(text) {
  const nb = JSON.parse(text);
  for (const cell of nb.cells) {
    if (cell.cell_type !== "code") continue;
    cell.outputs = [];
    cell.execution_count = null;
    if (cell.metadata) for (const k of ["execution", "collapsed", "scrolled"]) delete cell.metadata[k];
  }
  delete nb.metadata.widgets;
  delete nb.metadata.qwenbook_run_seconds;
  const out = JSON.stringify(nb, null, 1) + "\n";
  return { out, changed: out !== text };
}

export function notebooks() {
  return readdirSync(dir).filter((f) => f.endsWith(".ipynb")).sort().map((f) => join(dir, f));
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const check = process.argv.includes("--check");
  const dirty = [];
  for (const file of notebooks()) {
    const { out, changed } = strip(readFileSync(file, "utf8"));
    if (!changed) continue;
    dirty.push(file);
    if (!check) writeFileSync(file, out);
  }
  if (check && dirty.length) {
    console.error(`notebooks with outputs (run node tests/notebooks/strip.mjs):\n${dirty.join("\n")}`);
    process.exit(1);
  }
  console.log(check ? "all notebooks are stripped" : `stripped ${dirty.length} notebook(s)`);
}
