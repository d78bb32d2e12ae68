import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
// @ts-expect-error: a plain .mjs build script without declarations
import { TYPES_PATH, renderBundleTypes } from "../scripts/bundle-types.mjs";

describe("schema/bundles.d.ts", () => {
  it("is what the generator makes from schema/bundles.json (run `npm run build:types -w extension`)", async () => {
    expect(readFileSync(TYPES_PATH as string, "utf8")).toBe(await renderBundleTypes());
  }, 30_000);
});
