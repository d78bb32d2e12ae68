import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
// @ts-expect-error plain ESM helper without type declarations
import { notebooks, strip } from "./strip.mjs";

describe("committed notebooks", () => {
  const files = (notebooks as () => string[])();

  it("include the tutorials", () => {
    const names = files.map((f) => f.split("/").pop());
    expect(names).toEqual(
      expect.arrayContaining([
        "00-hello.ipynb",
        "01-chat.ipynb",
        "02-lora-role-play.ipynb",
        "03-self-cognition.ipynb",
        "04-qlora-fast.ipynb",
        "05-multiturn-merge-quantize.ipynb",
        "06-several-gpus.ipynb",
        "07-qwen3-agent.ipynb",
      ]),
    );
  });

  it.each(files)("%s carries no outputs", (file) => {
    const { changed } = (strip as (t: string) => { changed: boolean })(readFileSync(file, "utf8"));
    expect(changed, `${file} has outputs or execution counts: run node tests/notebooks/strip.mjs`).toBe(false);
  });

  it("strip() removes outputs and counts", () => {
    const dirty = JSON.stringify({
      cells: [{ cell_type: "code", source: "1", metadata: {}, execution_count: 3, outputs: [{ output_type: "stream", name: "stdout", text: "1" }] }],
      metadata: {}, nbformat: 4, nbformat_minor: 5,
    });
    const { out, changed } = (strip as (t: string) => { out: string; changed: boolean })(dirty);
    expect(changed).toBe(true);
    const cell = JSON.parse(out).cells[0];
    expect(cell.outputs).toEqual([]);
    expect(cell.execution_count).toBeNull();
  });
});
