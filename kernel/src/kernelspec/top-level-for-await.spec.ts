import { createRequire } from "node:module";
import { describe, expect, it } from "vitest";
import { hasTopLevelForAwait, patchConverter, type TsForAwait } from "./top-level-for-await";

// The TypeScript build tslab itself uses.
const ts = createRequire(require.resolve("tslab/package.json"))("@tslab/typescript-for-tslab") as TsForAwait;

describe("hasTopLevelForAwait", () => {
  it("finds for-await at the top level, also inside blocks, but not inside functions or classes", () => {
    expect(hasTopLevelForAwait(ts, "for await (const p of s()) console.log(p);")).toBe(true);
    expect(hasTopLevelForAwait(ts, "if (x) { for await (const p of s()) {} }")).toBe(true);
    expect(hasTopLevelForAwait(ts, "async function f() { for await (const p of s()) {} }")).toBe(false);
    expect(hasTopLevelForAwait(ts, "const f = async () => { for await (const p of s()) {} };")).toBe(false);
    expect(hasTopLevelForAwait(ts, "class C { async m() { for await (const p of s()) {} } }")).toBe(false);
    expect(hasTopLevelForAwait(ts, "for (const p of s()) {}")).toBe(false);
  });
});

describe("patchConverter", () => {
  it("marks a clean cell with top-level for-await as needing the async wrapper, and leaves others alone", () => {
    const results = [
      { hasToplevelAwait: false, diagnostics: [] },
      { hasToplevelAwait: false, diagnostics: ["a type error"] },
      { hasToplevelAwait: false, diagnostics: [] },
    ];
    const mod = { createConverter: (_options?: unknown) => ({ convert: (_prev: string, _src: string) => results.shift()! }) };
    patchConverter(mod, ts);
    const conv = mod.createConverter();
    const loop = "for await (const p of s()) {}";
    expect(conv.convert("", loop).hasToplevelAwait).toBe(true);
    expect(conv.convert("", loop).hasToplevelAwait).toBe(false);
    expect(conv.convert("", "const x = 1;").hasToplevelAwait).toBe(false);
  });
});
