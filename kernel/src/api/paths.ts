import { homedir } from "node:os";
import { resolve } from "node:path";

/** `~` and `~/...` expanded to the home folder; other paths unchanged. */
export function expandHome(path: string): string {
  return path === "~" || path.startsWith("~/") ? homedir() + path.slice(1) : path;
}

/** `~` and relative paths resolved against `cwd` (a notebook's folder): the worker runs elsewhere. */
export function resolvePath(path: string, cwd: string = process.cwd()): string {
  return resolve(cwd, expandHome(path));
}
