// The package's module structure: no import cycles (type-only imports included: they tie the files
// together just the same for whoever reads or moves them), and the lower layers never reach up.
// A cycle in CommonJS also means some module sees another's exports half-initialised at load time.
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { describeCycle, importCycles, importGraph, importsAcross } from "./testutil";

const SRC = dirname(fileURLToPath(import.meta.url));

describe("the import scanner", () => {
  const dir = mkdtempSync(join(tmpdir(), "qwenbook-graph-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const write = (rel: string, text: string): void => {
    mkdirSync(dirname(join(dir, rel)), { recursive: true });
    writeFileSync(join(dir, rel), text);
  };
  // a → sub (plain; the folder's index) → sub/b (export *) → c (type-only, written ".js") → a (re-export):
  // one cycle of four; d → a and f → d are no cycle; e imports itself.
  write("a.ts", 'import { b } from "./sub";\nexport const a = b;\n');
  write("sub/index.ts", 'export * from "./b";\n');
  write("sub/b.ts", 'import type { C } from "../c.js";\nexport const b: C = 1;\n');
  write("c.ts", 'export { a } from "./a";\nexport type C = number;\n');
  write("d.ts", 'import { a } from "./a";\nimport "./style.css";\nexport const d = a;\n');
  write("e.ts", 'import type { E } from "./e";\nexport type E = string;\nexport const x: E = "";\n');
  write("low/f.ts", 'import { d } from "../d";\nexport const f = d;\n');
  write("g.ts", 'import { nothing } from "./missing";\nexport const g = nothing;\n');
  write("a.spec.ts", 'import { g } from "./g";\nimport { a } from "./a";\n');
  write("style.css", "");
  const graph = importGraph(dir);

  it("reads plain, type-only and re-export imports, resolving .js and folders", () => {
    expect(graph.files).toEqual(["a.ts", "c.ts", "d.ts", "e.ts", "g.ts", "low/f.ts", "sub/b.ts", "sub/index.ts"]);
    expect(graph.edges.get("a.ts")).toEqual(["sub/index.ts"]);
    expect(graph.edges.get("sub/index.ts")).toEqual(["sub/b.ts"]);
    expect(graph.edges.get("sub/b.ts")).toEqual(["c.ts"]);
    expect(graph.edges.get("c.ts")).toEqual(["a.ts"]);
    expect(graph.unresolved).toEqual(["g.ts: ./missing"]);
  });

  it("finds every cycle, a file importing itself included, and names its files", () => {
    const cycles = importCycles(graph);
    expect(cycles).toEqual([["a.ts", "c.ts", "sub/b.ts", "sub/index.ts"], ["e.ts"]]);
    expect(describeCycle(graph, cycles[0])).toBe(
      "import cycle through 4 files:\n  a.ts -> sub/index.ts\n  c.ts -> a.ts\n  sub/b.ts -> c.ts\n  sub/index.ts -> sub/b.ts",
    );
  });

  it("finds imports that cross into a banned folder", () => {
    expect(importsAcross(graph, "low", ["sub"])).toEqual([]);
    expect(importsAcross(graph, "sub", ["low"])).toEqual([]);
    write("low/h.ts", 'import { b } from "../sub/b";\nexport const h = b;\n');
    expect(importsAcross(importGraph(dir), "low", ["sub"])).toEqual(["low/h.ts -> sub/b.ts"]);
  });
});

describe("kernel/src", () => {
  const graph = importGraph(SRC);

  it("resolves every relative import to a file", () => {
    expect(graph.unresolved).toEqual([]);
    // The scan sees the real tree: the entry point's imports are there.
    expect(graph.edges.get("index.ts")).toContain("api/model.ts");
    expect(graph.files.length).toBeGreaterThan(50);
  });

  it("has no import cycles", () => {
    const cycles = importCycles(graph).map((c) => describeCycle(graph, c));
    expect(cycles.join("\n\n")).toBe("");
  });

  // bridge/ is the worker client: it knows the wire, nothing about notebooks or the API built on it.
  it("bridge/ never imports api/, display/, kernelspec/ or cli/", () => {
    expect(importsAcross(graph, "bridge", ["api", "display", "kernelspec", "cli"])).toEqual([]);
  });

  // display/ draws bundles for whatever calls it; the API calls it, never the other way round.
  it("display/ never imports api/ or kernelspec/", () => {
    expect(importsAcross(graph, "display", ["api", "kernelspec"])).toEqual([]);
  });
});
