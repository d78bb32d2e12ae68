import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
// @ts-expect-error plain ESM helper without type declarations
import { notebooks } from "./strip.mjs";

/**
 * The worker keeps one copy of a model per (folder, resolved dtype, device), so a tutorial's
 * `qwen.load(modelId)` "returns at once" only when it asks for the same dtype as the tutorial that
 * loaded the model first. On a CPU an explicit "bf16" and the default ("auto" = fp32 there) are
 * two different copies, so a second one would be loaded beside the first.
 */
function firstLoadOfModelId(file: string): { dtype: string; device: string } {
  const nb = JSON.parse(readFileSync(file, "utf8")) as { cells: { cell_type: string; source: string | string[] }[] };
  for (const cell of nb.cells) {
    if (cell.cell_type !== "code") continue;
    const source = Array.isArray(cell.source) ? cell.source.join("") : cell.source;
    const call = /qwen\.load\(modelId(?:,\s*(\{[^}]*\}))?\)/.exec(source);
    if (!call) continue;
    const options = call[1] ?? "";
    const dtype = /dtype:\s*"([^"]+)"/.exec(options)?.[1] ?? "auto";
    const device = /device:\s*"([^"]+)"/.exec(options)?.[1] ?? "auto";
    return { dtype, device };
  }
  throw new Error(`${file} never calls qwen.load(modelId, ...)`);
}

describe("tutorials that reuse the model an earlier one loaded", () => {
  const files = (notebooks as () => string[])();
  const find = (prefix: string) => {
    const file = files.find((f) => f.split("/").pop()!.startsWith(prefix));
    if (!file) throw new Error(`no notebook ${prefix}*`);
    return file;
  };

  it.each(["02-", "03-", "05-"])("%s loads modelId with the same dtype and device as 01, so its load returns at once", (prefix) => {
    expect(firstLoadOfModelId(find(prefix))).toEqual(firstLoadOfModelId(find("01-")));
  });

  it("02 says so, and 01 says which dtype the default picks", () => {
    const text = (file: string) => readFileSync(file, "utf8");
    expect(text(find("02-"))).toMatch(/returns at once/);
    expect(text(find("01-"))).toMatch(/fp32 on a CPU/);
  });
});
