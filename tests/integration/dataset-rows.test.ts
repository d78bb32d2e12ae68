// The kernel checks a dataset's first rows at `.dataset()` (kernel/src/api/dataset-rows.ts) so a wrong
// format fails early; this holds it to the worker's parser (engine/data/datasets.py), which reads the rows at
// train(): for each row and format both must accept it, or both refuse it on the same field. Preference pairs
// likewise (preference-rows.ts against engine/data/preference_data.py).
import { execFileSync } from "node:child_process";
import { beforeAll, describe, expect, it } from "vitest";
import { checkRows, DatasetRowError, type RowFormat } from "../../kernel/src/api/dataset-rows";
import { checkPreferenceRows } from "../../kernel/src/api/preference-rows";
import { python, repo } from "./helpers";

const turn = (from: unknown, value: unknown) => ({ from, value });
const ROWS: unknown[] = [
  { instruction: "q", output: "a" },
  { instruction: "q", input: "x", output: "a", system: "s", history: [["q0", "a0"]] },
  { instruction: "q", input: null, output: "a" },
  { instruction: "q" },
  { output: "a" },
  { instruction: 1, output: "a" },
  { instruction: "q", output: "a", input: 2 },
  { instruction: "q", output: "a", history: "no" },
  { instruction: "q", output: "a", history: [["only one"]] },
  { instruction: "q", output: "a", history: [["q", 3]] },
  { conversations: [turn("human", "q"), turn("gpt", "a")] },
  { conversations: [turn("system", "s"), turn("user", "q"), turn("assistant", "a")] },
  { messages: [{ role: "user", content: "q" }, { role: "assistant", content: "a" }], system: "s" },
  { messages: [{ role: "system", content: "s" }, { role: "user", content: "q" }, { role: "assistant", content: "a" }], system: "s2" },
  { conversations: [turn(" Human ", "q"), turn("MODEL", "a")] },
  { conversations: [] },
  { conversations: "hi" },
  { conversations: [turn("human", "q")] },
  { conversations: [turn("gpt", "a")] },
  { conversations: [turn("human", "q"), turn("human", "q2")] },
  { conversations: [turn("human", "q"), turn("narrator", "a")] },
  { conversations: [turn("human", "q"), turn(7, "a")] },
  { conversations: [turn("human", "q"), turn("gpt", 5)] },
  { conversations: [{ value: "q" }] },
  { conversations: [{ from: "human" }] },
  { conversations: ["q"] },
  { conversations: [turn("human", "q"), turn("gpt", "a"), turn("system", "s")] },
  { conversations: [turn("human", "q"), turn("gpt", "a")], system: 3 },
  { query: "你是？", response: "我是小黄" },
  "just text",
  [1, 2],
];

interface Outcome {
  ok: boolean;
  field: string | null;
}

function kernelOutcome(format: RowFormat | "auto", row: unknown): Outcome {
  try {
    checkRows("rows", format, [[1, row]]);
    return { ok: true, field: null };
  } catch (error) {
    if (!(error instanceof DatasetRowError)) throw error;
    return { ok: false, field: error.field ?? null };
  }
}

const FORMATS = ["alpaca", "sharegpt", "auto"] as const;

/** What the worker's parser says of each row, per format (one Python run for all). */
function workerOutcomes(): Record<string, Outcome[]> {
  const script = `
import json, sys
from qwenbook_bridge.engine.data.datasets import DatasetError, DatasetSpec, load_conversations
rows = json.load(sys.stdin)
out = {}
for fmt in ${JSON.stringify(FORMATS)}:
    out[fmt] = []
    for row in rows:
        try:
            load_conversations(DatasetSpec(source=[row], format=fmt))
            out[fmt].append({"ok": True, "field": None})
        except DatasetError as e:
            out[fmt].append({"ok": False, "field": e.field})
print(json.dumps(out))
`;
  const stdout = execFileSync(python, ["-c", script], {
    cwd: `${repo}/python-bridge`,
    input: JSON.stringify(ROWS),
    env: { ...process.env, PYTHONPATH: `${repo}/python-bridge` },
    encoding: "utf8",
  });
  return JSON.parse(stdout) as Record<string, Outcome[]>;
}

describe("the kernel's early row check and the worker's parser", () => {
  let outcomes: Record<string, Outcome[]>;
  beforeAll(() => {
    outcomes = workerOutcomes();
  });

  it.each(FORMATS)("accept and refuse the same rows, on the same field, as format %s", (format) => {
    const worker = outcomes[format];
    const kernel = ROWS.map((row) => kernelOutcome(format, row));
    const table = (outcomes: Outcome[]) => ROWS.map((row, i) => `${JSON.stringify(row)} -> ${outcomes[i].ok ? "ok" : `refused (${outcomes[i].field})`}`);
    expect(table(kernel)).toEqual(table(worker));
    // Both kinds occur, so the comparison means something.
    expect(worker.some((o) => o.ok) && worker.some((o) => !o.ok)).toBe(true);
  });
});

// The same for preference pairs: kernel/src/api/preference-rows.ts against engine/data/preference_data.py.
const say = (role: unknown, content: unknown) => ({ role, content });
const PAIRS: unknown[] = [
  { prompt: "q", chosen: "a", rejected: "b" },
  { prompt: "q", system: "s", chosen: say("assistant", "a"), rejected: [say("assistant", "b")] },
  { messages: [say("system", "s"), say("user", "q"), say("assistant", "a"), say("user", "q2")], chosen: "a", rejected: "b" },
  { prompt: [say("user", "q")], chosen: "a", rejected: "b" },
  { messages: [{ from: "human", value: "q" }], chosen: { from: "gpt", value: "a" }, rejected: "b" },
  { prompt: "q", chosen: "a" },
  { prompt: "q", rejected: "b" },
  { chosen: "a", rejected: "b" },
  { prompt: "q", messages: [say("user", "q")], chosen: "a", rejected: "b" },
  { prompt: "", chosen: "a", rejected: "b" },
  { prompt: 3, chosen: "a", rejected: "b" },
  { prompt: "q", chosen: "  ", rejected: "b" },
  { prompt: "q", chosen: 1, rejected: "b" },
  { prompt: "q", chosen: say("user", "a"), rejected: "b" },
  { prompt: "q", chosen: say("assistant", ""), rejected: "b" },
  { prompt: "q", chosen: "a", rejected: say("assistant", 2) },
  { prompt: "q", system: 4, chosen: "a", rejected: "b" },
  { messages: [], chosen: "a", rejected: "b" },
  { messages: "q", chosen: "a", rejected: "b" },
  { messages: [say("user", "q"), say("assistant", "a")], chosen: "a", rejected: "b" },
  { messages: [say("assistant", "a"), say("user", "q")], chosen: "a", rejected: "b" },
  { messages: [say("user", "q"), say("narrator", "x")], chosen: "a", rejected: "b" },
  { messages: [say("user", "q"), say("system", "s")], chosen: "a", rejected: "b" },
  { messages: [say("user", 5)], chosen: "a", rejected: "b" },
  { messages: ["q"], chosen: "a", rejected: "b" },
  { instruction: "q", output: "a" },
  "just text",
];

function kernelPairOutcome(row: unknown): Outcome {
  try {
    checkPreferenceRows("rows", [[1, row]]);
    return { ok: true, field: null };
  } catch (error) {
    if (!(error instanceof DatasetRowError)) throw error;
    return { ok: false, field: error.field ?? null };
  }
}

describe("the kernel's early preference-row check and the worker's", () => {
  it("accept and refuse the same pairs, on the same field", () => {
    const script = `
import json, sys
from qwenbook_bridge.engine.data.datasets import DatasetError
from qwenbook_bridge.engine.data.preference_data import row_to_pair
out = []
for row in json.load(sys.stdin):
    try:
        row_to_pair(row, "rows", 1)
        out.append({"ok": True, "field": None})
    except DatasetError as e:
        out.append({"ok": False, "field": e.field})
print(json.dumps(out))
`;
    const worker = JSON.parse(
      execFileSync(python, ["-c", script], { cwd: `${repo}/python-bridge`, input: JSON.stringify(PAIRS), env: { ...process.env, PYTHONPATH: `${repo}/python-bridge` }, encoding: "utf8" }),
    ) as Outcome[];
    const table = (outcomes: Outcome[]) => PAIRS.map((row, i) => `${JSON.stringify(row)} -> ${outcomes[i]!.ok ? "ok" : `refused (${outcomes[i]!.field})`}`);
    expect(table(PAIRS.map(kernelPairOutcome))).toEqual(table(worker));
    expect(worker.filter((o) => o.ok).length).toBe(5);
  });
});
