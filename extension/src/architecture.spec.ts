// The renderers' module structure: no import cycles, type-only imports included (see the kernel's
// architecture spec, whose import scanner this uses).
import { dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { describeCycle, importCycles, importGraph } from "../../kernel/src/testutil";

const SRC = dirname(fileURLToPath(import.meta.url));

describe("extension/src", () => {
  const graph = importGraph(SRC);

  it("resolves every relative import to a file", () => {
    expect(graph.unresolved).toEqual([]);
    // The scan sees the real tree: the plugin's entry point imports the renderers.
    expect(graph.edges.get("index.ts")).toContain("chat.ts");
  });

  it("has no import cycles", () => {
    const cycles = importCycles(graph).map((c) => describeCycle(graph, c));
    expect(cycles.join("\n\n")).toBe("");
  });
});
