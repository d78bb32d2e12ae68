#!/usr/bin/env node
// Regenerates src/bundles.gen.ts from the shared bundles.json; `--check` fails instead of writing when it is stale.
import { readFile, utimes, writeFile } from "node:fs/promises";
import { TYPES_PATH, renderBundleTypes } from "./bundle-types.mjs";

const fresh = await renderBundleTypes();
const current = await readFile(TYPES_PATH, "utf8").catch(() => "");
const path = TYPES_PATH;
if (fresh === current) {
  // A schema edit that leaves the types as they were still makes the file look stale to the build; mark it checked.
  if (!process.argv.includes("--check")) await utimes(TYPES_PATH, new Date(), new Date());
  console.log(`${path} is up to date`);
} else if (process.argv.includes("--check")) {
  console.error(`${path} is stale: run \`npm run build:types -w extension\` and keep the result.`);
  process.exit(1);
} else {
  await writeFile(TYPES_PATH, fresh);
  console.log(`wrote ${path}`);
}
