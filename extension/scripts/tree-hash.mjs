// A content hash of a folder, so scripts can tell "already built/installed" from "changed" cheaply.
import { createHash } from "node:crypto";
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { join, relative } from "node:path";

/** Hash of every file's path and bytes under the given roots; names starting with "." are skipped. */
export function treeHash(roots, base) {
  const hash = createHash("sha256");
  for (const root of roots) {
    if (!existsSync(root)) {
      hash.update(`missing:${relative(base, root)}\0`);
      continue;
    }
    for (const file of statSync(root).isDirectory() ? listFiles(root) : [root]) {
      hash.update(relative(base, file)).update("\0").update(readFileSync(file)).update("\0");
    }
  }
  return hash.digest("hex");
}

function listFiles(path) {
  const entries = readdirSync(path, { withFileTypes: true }).filter((e) => !e.name.startsWith("."));
  entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const files = [];
  for (const e of entries) {
    const full = join(path, e.name);
    if (e.isDirectory()) files.push(...listFiles(full));
    else if (e.isFile()) files.push(full);
  }
  return files;
}
