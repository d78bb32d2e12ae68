import { existsSync, statSync } from "node:fs";
import { isAbsolute, resolve } from "node:path";
import { expandHome } from "./paths";
import { expectString } from "./validate";

/**
 * Turns what a user passed to `qwen.load` into what the worker needs: an absolute folder (the
 * worker runs in another directory, so a relative path must be resolved here) or a hub id.
 * A string that can only be a path but names no folder fails here, with the path it tried.
 */
export function resolveModelSource(model: unknown, cwd: string = process.cwd()): string {
  const given = expectString("load(model)", model).trim();
  if (given === "") throw new RangeError("load(model) needs a hub id or a folder, got an empty string");
  const expanded = expandHome(given);
  const abs = resolve(cwd, expanded);
  if (existsSync(abs)) {
    if (!statSync(abs).isDirectory()) {
      throw new Error(`${abs} is a file; load() takes a model folder (with config.json and weights) or a hub id`);
    }
    return abs;
  }
  const pathLike =
    isAbsolute(expanded) || /^\.\.?([/\\]|$)/.test(expanded) || expanded !== given || expanded.includes("\\") || expanded.split("/").length > 2;
  if (pathLike) {
    throw new Error(
      `No model folder at ${abs} (from ${JSON.stringify(given)}). Pass an existing folder with config.json and weights, ` +
        'or a hub id such as "Qwen/Qwen2.5-7B-Instruct".',
    );
  }
  if (!/^[\w.-]+(\/[\w.-]+)?$/.test(expanded)) {
    throw new Error(`${JSON.stringify(given)} is neither an existing folder nor a hub id like "Qwen/Qwen2.5-7B-Instruct"`);
  }
  return expanded;
}
