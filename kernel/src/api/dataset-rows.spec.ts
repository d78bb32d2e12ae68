import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { BYTES_CHECKED, ROWS_CHECKED, firstRows } from "./dataset-rows";
import { datasetEntry, SelfCognition } from "./datasets";

const dir = mkdtempSync(join(tmpdir(), "qwenbook-rows-"));
const file = (name: string, text: string) => {
  const path = join(dir, name);
  writeFileSync(path, text);
  return path;
};
const alpaca = (i: number) => ({ instruction: `q${i}`, input: "", output: `a${i}` });
const sharegpt = (i: number) => ({ conversations: [{ from: "human", value: `q${i}` }, { from: "gpt", value: `a${i}` }] });

describe(".dataset(path, { format }) checks the first rows at once", () => {
  it("refuses an alpaca file given as sharegpt, naming the file, row, field and the format that fits", () => {
    const path = file("alpaca.json", JSON.stringify([alpaca(1), alpaca(2)], null, 2));
    expect(() => datasetEntry(path, { format: "sharegpt" }, dir)).toThrow(
      `${path}, row 1, field "conversations": is missing (checked as format "sharegpt"); this looks like alpaca rows ({ instruction, input, output }): use format: "alpaca"`,
    );
    expect(datasetEntry(path, { format: "alpaca" }, dir).wire).toEqual({ path, format: "alpaca" });
    expect(datasetEntry(path, {}, dir).wire).toEqual({ path });
  });

  it("refuses a sharegpt JSONL file given as alpaca, numbering rows by line as the worker does", () => {
    const path = file("chats.jsonl", `\n${JSON.stringify(sharegpt(1))}\n`);
    expect(() => datasetEntry(path, { format: "alpaca" }, dir)).toThrow(
      `${path}, row 2, field "instruction": is missing (checked as format "alpaca"); this looks like sharegpt rows ({ conversations: [...] }): use format: "sharegpt"`,
    );
    expect(datasetEntry(path, { format: "sharegpt" }, dir).label).toBe("chats.jsonl (sharegpt)");
  });

  it("finds a bad row among the first ones, and points ms-swift self-cognition rows at qwen.datasets.selfCognition", () => {
    const mixed = file("mixed.json", JSON.stringify([alpaca(1), alpaca(2), { instruction: "q3" }]));
    expect(() => datasetEntry(mixed, {}, dir)).toThrow(`${mixed}, row 3, field "output": is missing (checked as format "alpaca")`);
    const swift = file("self_cognition.jsonl", '{"query": "你是？", "response": "我是{{NAME}}", "tag": "zh"}\n');
    expect(() => datasetEntry(swift, {}, dir)).toThrow(/row 1: cannot tell the format.*ms-swift self-cognition rows \(\{ query, response \}\).*qwen\.datasets\.selfCognition\(\{ name, author \}\)/);
    expect(() => datasetEntry(swift, { format: "alpaca" }, dir)).toThrow(/row 1, field "instruction": is missing .*ms-swift self-cognition rows/);
    const s = new SelfCognition({ name: "小黄", author: "魔搭" });
    expect(() => datasetEntry(s, { format: "sharegpt" }, dir)).toThrow(/selfCognition\(\) rows are alpaca rows/);
  });

  it("checks sharegpt turns as the worker does", () => {
    const bad = (row: unknown) => () => datasetEntry([row as never], { format: "sharegpt" }, dir);
    expect(bad({ conversations: [{ from: "human", value: "q" }] })).toThrow(/field "conversations\[0\]": the last turn must be the assistant's/);
    expect(bad({ conversations: [{ from: "gpt", value: "a" }] })).toThrow(/conversations\[0\]\.from": turns must alternate/);
    expect(bad({ messages: [{ role: "narrator", content: "x" }] })).toThrow(/messages\[0\]\.role": unknown role "narrator"/);
    expect(bad({ conversations: [] })).toThrow(/"conversations": must be a non-empty list of turns/);
    expect(() => datasetEntry([{ messages: [{ role: "system", content: "s" }, { role: "user", content: "q" }, { role: "assistant", content: "a" }] }], {}, dir)).not.toThrow();
    expect(() => datasetEntry([alpaca(1), { instruction: "x", output: 3 } as never], {}, dir)).toThrow(/dataset\(rows\), row 2, field "output": must be a string, got int/);
  });

  it("reads only the start of a big file: rows past the first ones are left to the worker", () => {
    const good = Array.from({ length: ROWS_CHECKED }, (_, i) => alpaca(i + 1));
    // Everything after the checked rows is not JSON at all; parsing the whole file would fail.
    const tail = "x".repeat(BYTES_CHECKED + 1024);
    const json = file("big.json", JSON.stringify(good).slice(0, -1) + "," + tail);
    expect(firstRows(json).map(([n]) => n)).toEqual(good.map((_, i) => i + 1));
    expect(() => datasetEntry(json, { format: "alpaca" }, dir)).not.toThrow();
    const jsonl = file("big.jsonl", good.map((r) => JSON.stringify(r)).join("\n") + "\n" + tail);
    expect(() => datasetEntry(jsonl, { format: "alpaca" }, dir)).not.toThrow();
    // One row longer than what is read at .dataset(): nothing to check there, the worker reads it whole.
    const long = file("long.json", `[{"instruction": "${"y".repeat(BYTES_CHECKED)}", "output": "a"}]`);
    expect(firstRows(long)).toEqual([]);
  });

  it("splits a JSON list by its elements, not by brackets or commas inside strings", () => {
    const rows = [{ instruction: 'a, "b" ] } [', output: "\\" }, { instruction: "{", output: "]", history: [["x", "y"]] }];
    const path = file("tricky.json", `\uFEFF ${JSON.stringify(rows, null, 1)} `);
    expect(firstRows(path)).toEqual([[1, rows[0]], [2, rows[1]]]);
  });

  it("refuses at once what the worker refuses as a whole file", () => {
    expect(() => datasetEntry(file("empty.json", " \n"), {}, dir)).toThrow(/empty\.json: is empty/);
    expect(() => datasetEntry(file("nothing.json", "[ ]"), {}, dir)).toThrow(/holds an empty list/);
    expect(() => datasetEntry(file("one.json", JSON.stringify(alpaca(1), null, 2)), {}, dir)).toThrow(/holds a JSON object; expected a list of rows/);
    expect(() => datasetEntry(file("bad.jsonl", `${JSON.stringify(alpaca(1))}\n{oops}\n`), {}, dir)).toThrow(/bad\.jsonl, row 2: line 2 is not valid JSON/);
    // A .json file of one object per line is JSONL to the worker too.
    expect(datasetEntry(file("lines.json", `${JSON.stringify(alpaca(1))}\n${JSON.stringify(alpaca(2))}\n`), {}, dir).wire.path).toMatch(/lines\.json$/);
  });
});
