// The import graph of a source tree, for the architecture specs (kernel and extension): which file
// imports which, read with the TypeScript compiler's own import scanner so that `import type`,
// `export ... from` and `import("...")` count as edges the same as a plain import.
import { existsSync, readFileSync, readdirSync, statSync } from "node:fs";
import { dirname, join, relative, resolve, sep } from "node:path";
import ts from "typescript";

export interface ImportGraph {
  /** Absolute folder the paths below are relative to. */
  root: string;
  /** Every file scanned, relative to root with "/" separators, sorted. */
  files: string[];
  /** file → the files under root it imports (relative, sorted, no duplicates). */
  edges: Map<string, string[]>;
  /** Relative imports that name no file: "from.ts: ./missing". A scanner that drops edges proves nothing. */
  unresolved: string[];
}

/** The non-spec .ts files under `root` (declaration files excluded) and their relative imports. */
export function importGraph(root: string): ImportGraph {
  const abs = resolve(root);
  const files = walk(abs)
    .filter((f) => f.endsWith(".ts") && !f.endsWith(".spec.ts") && !f.endsWith(".d.ts"))
    .map((f) => toRel(abs, f))
    .sort();
  const scanned = new Set(files);
  const edges = new Map<string, string[]>();
  const unresolved: string[] = [];
  for (const file of files) {
    const info = ts.preProcessFile(readFileSync(join(abs, file), "utf8"), true, true);
    const targets = new Set<string>();
    for (const { fileName: spec } of info.importedFiles) {
      if (!spec.startsWith(".")) continue; // a package, not a file of this tree
      const target = resolveImport(join(abs, dirname(file)), spec);
      if (target === undefined) unresolved.push(`${file}: ${spec}`);
      else if (scanned.has(toRel(abs, target))) targets.add(toRel(abs, target));
      // Anything else is no node of this graph: a file outside root (the extension's specs import kernel code on
      // purpose), a declaration file, a stylesheet.
    }
    edges.set(file, [...targets].sort());
  }
  return { root: abs, files, edges, unresolved };
}

/** What a relative specifier loads, as TypeScript resolves it: the .ts file (".js" written for ".ts"), or a folder's index. */
function resolveImport(fromDir: string, spec: string): string | undefined {
  const base = resolve(fromDir, spec);
  const stem = base.replace(/\.(m|c)?js$/, "");
  const candidates = [`${stem}.ts`, `${stem}.d.ts`, join(base, "index.ts"), base];
  return candidates.find((c) => existsSync(c) && statSync(c).isFile());
}

/**
 * The import cycles: Tarjan's strongly connected components that hold more than one file, or one
 * file importing itself. Each is sorted; the list is sorted by its first file.
 */
export function importCycles(graph: ImportGraph): string[][] {
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const out: string[][] = [];
  let next = 0;
  const visit = (v: string): void => {
    index.set(v, next);
    low.set(v, next);
    next += 1;
    stack.push(v);
    onStack.add(v);
    for (const w of graph.edges.get(v) ?? []) {
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (onStack.has(w)) {
        low.set(v, Math.min(low.get(v)!, index.get(w)!));
      }
    }
    if (low.get(v) !== index.get(v)) return;
    const component: string[] = [];
    let w: string;
    do {
      w = stack.pop()!;
      onStack.delete(w);
      component.push(w);
    } while (w !== v);
    if (component.length > 1 || (graph.edges.get(v) ?? []).includes(v)) out.push(component.sort());
  };
  for (const file of graph.files) if (!index.has(file)) visit(file);
  return out.sort((a, b) => a[0].localeCompare(b[0]));
}

/** A cycle as a failure message: its files, each with the imports that keep it in the cycle. */
export function describeCycle(graph: ImportGraph, cycle: readonly string[]): string {
  const members = new Set(cycle);
  const lines = cycle.map((f) => `  ${f} -> ${(graph.edges.get(f) ?? []).filter((t) => members.has(t)).join(", ")}`);
  return `import cycle through ${cycle.length} files:\n${lines.join("\n")}`;
}

/** Imports from files under folder `from` into any of the folders `banned` (all relative to root): "from.ts -> to.ts". */
export function importsAcross(graph: ImportGraph, from: string, banned: readonly string[]): string[] {
  const inside = (file: string, folder: string): boolean => file.startsWith(`${folder}/`);
  const out: string[] = [];
  for (const file of graph.files.filter((f) => inside(f, from))) {
    for (const target of graph.edges.get(file) ?? []) {
      if (banned.some((b) => inside(target, b))) out.push(`${file} -> ${target}`);
    }
  }
  return out;
}

function walk(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const path = join(dir, e.name);
    if (e.isDirectory()) return e.name === "node_modules" ? [] : walk(path);
    return e.isFile() ? [path] : [];
  });
}

function toRel(root: string, file: string): string {
  return relative(root, file).split(sep).join("/");
}
