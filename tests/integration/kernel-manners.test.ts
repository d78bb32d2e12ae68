// The kernel's manners, through Jupyter's own client: busy/idle around each execute request as it
// runs (three queued), a request sent right after an error runs, errors print one line (a worker
// error, a bad argument), an interrupted chat prints no error and keeps its reply reachable, and
// values a widget has shown (a reply, a preview, a server's final counters) are not printed again.
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CHAT_MIME, type ChatBundle } from "../../kernel/src/display/bundles";
import { Qwen } from "../../kernel/src/index";
import { privateRuntimeDir, runCli, tinyModel } from "./helpers";
import { drive, type CellResult } from "./kernel-harness";

const prefix = mkdtempSync(join(tmpdir(), "qwenbook-manners-prefix-"));
const notebookDir = mkdtempSync(join(tmpdir(), "qwenbook-manners-"));
let cells: CellResult[];

function lastChat(cell: CellResult): ChatBundle | undefined {
  return cell.displays.filter((d) => CHAT_MIME in d.data).map((d) => d.data[CHAT_MIME] as ChatBundle).pop();
}

beforeAll(async () => {
  privateRuntimeDir("kernel-manners");
  const install = runCli("kernelspec", "install", "--prefix", prefix);
  expect(install.status, install.stderr).toBe(0);
  mkdirSync(join(notebookDir, "data"));
  const rows = Array.from({ length: 4 }, (_, i) => ({ instruction: `问题${i}`, input: "", output: `回答${i}号` }));
  writeFileSync(join(notebookDir, "data", "rows.json"), JSON.stringify(rows));
  const tiny = JSON.stringify(tinyModel());
  cells = await drive(prefix, notebookDir, [
    /* 0 */ { code: `import { qwen } from "qwenbook";\nconst m = await qwen.load(${tiny}, { quiet: true });` },
    // The first runs long enough for the other two to be waiting when it ends.
    /* 1 */ { batch: ['await m.chat("Tell me a story.").greedy().maxTokens(24).quiet();\n"first"', '"second"', '"third"'] },
    /* 2 */ { code: 'throw new Error("first cell fails");' },
    /* 3 */ { code: '"ran right after the error"', right_after_error: true },
    /* 4 */ { code: 'await qwen.load("qwenbook-tests/no-such-model-anywhere", { quiet: true });' },
    /* 5 */ { code: "m.lora({ r: 0 });" },
    /* 6 */ { code: 'const story = await m.chat("Tell me a very long story.").greedy().maxTokens(3000);', interrupt_after_output: true },
    /* 7 */ {
      code:
        "const kept = qwen.lastReply()!;\n" +
        "JSON.stringify({ cancelled: kept.cancelled, text: kept.text, same: kept === story, storyCancelled: story.cancelled })",
    },
    /* 8 */ { code: 'const hi = await m.chat("hi").greedy().maxTokens(4);\nhi' },
    /* 9 */ { code: 'await m.lora().dataset("data/rows.json", { format: "alpaca" }).preview(2);' },
    /* 10 */ { code: "const server = await m.serve({ port: 0 });" },
    /* 11 */ { code: "await server.stop();" },
    /* 12 */ { code: 'qwen.debug(true);\nawait qwen.load("qwenbook-tests/no-such-model-anywhere", { quiet: true });' },
    /* 13 */ { code: "qwen.debug(false);\nawait m.unload();" },
    /* 14 */ { code: 'await m.chat("hi").maxTokens(2);' },
    /* 15 */ { code: "hi" },
    /* 16 */ { code: 'void Promise.reject(new RangeError("nobody waits for this"));\n"sent"' },
    /* 17 */ { code: '"next"' },
  ]);
});

afterAll(async () => {
  await new Qwen().shutdown();
});

describe("the kernel's manners", () => {
  it("reports busy from when each queued request starts executing until it ends, then idle", () => {
    const batch = cells[1];
    expect(batch.batch?.map((c) => c.status)).toEqual(["ok", "ok", "ok"]);
    expect(batch.batch?.map((c) => c.stream.trim())).toEqual(["first", "second", "third"]);
    expect(batch.statuses).toEqual([
      [0, "busy"],
      [0, "idle"],
      [1, "busy"],
      [1, "idle"],
      [2, "busy"],
      [2, "idle"],
    ]);
  });

  it("runs a request sent right after an error reply instead of aborting it", () => {
    expect(cells[2].status).toBe("error");
    expect(cells[2].stream).toBe("Error: first cell fails\n");
    expect(cells[3].status).toBe("ok");
    expect(cells[3].stream.trim()).toBe("ran right after the error");
  });

  it("prints a worker error as one line, named by the Python exception, without the error object", () => {
    expect(cells[4].status).toBe("error");
    expect(cells[4].stream).toMatch(/^ModelNotFoundError: .*qwenbook-tests\/no-such-model-anywhere[^\n]*\n$/);
    expect(cells[4].stream).not.toContain("traceback");
  });

  it("prints a bad argument as one line, without Node's source snippet or the stack", () => {
    expect(cells[5].status).toBe("error");
    expect(cells[5].stream).toBe("RangeError: lora option r must be at least 1, got 0\n");
  });

  it("ends an interrupted chat with its cancelled widget and no error text", () => {
    expect(cells[6].status).toBe("error");
    expect(cells[6].stream).not.toContain("Interrupted asynchronously");
    expect(cells[6].stream).toBe("");
    expect(lastChat(cells[6])?.state).toBe("cancelled");
  });

  it("keeps the interrupted reply: qwen.lastReply() holds it, and the awaited const got it, marked cancelled", () => {
    expect(cells[7].status, cells[7].stream).toBe("ok");
    const kept = JSON.parse(cells[7].stream.trim()) as { cancelled: boolean; text: string; same: boolean; storyCancelled: boolean };
    expect(kept.cancelled).toBe(true);
    expect(kept.text.length).toBeGreaterThan(0);
    expect(kept.text).toBe(lastChat(cells[6])?.messages.at(-1)?.content);
    expect(kept).toMatchObject({ same: true, storyCancelled: true });
  });

  it("does not echo values a widget has shown: a reply, a training preview, a stopped server's counters", () => {
    expect(lastChat(cells[8])?.state).toBe("done");
    expect(cells[8].stream).toBe("");
    expect(cells[9].status).toBe("ok");
    expect(cells[9].displays.length).toBe(1);
    expect(cells[9].stream).toBe("");
    expect(cells[10].status, cells[10].stream).toBe("ok");
    expect(cells[11].status, cells[11].stream).toBe("ok");
    expect(cells[11].stream).toBe("");
  });

  it("prints an unhandled rejection as one line too", () => {
    expect(cells[16].status).toBe("ok");
    expect(cells[16].stream).toContain("Unhandled rejection: RangeError: nobody waits for this\n");
    expect(cells[16].stream).not.toMatch(/\n {4}at /);
    expect(cells[17].stream.trim()).toBe("next");
  });

  it("prints a shown value named in a later cell, where no widget shows it", () => {
    expect(cells[15].status).toBe("ok");
    expect(cells[15].stream.trim()).toMatch(/^Reply\(4 tokens, length, [\d.]+ tok\/s\)$/);
  });

  it("prints the JS stack and the Python traceback with qwen.debug(true)", () => {
    expect(cells[12].status).toBe("error");
    expect(cells[12].stream).toContain("WorkerError: load failed: ModelNotFoundError");
    expect(cells[12].stream).toMatch(/\n {4}at /);
    expect(cells[12].stream).toContain("Traceback (most recent call last):");
  });

  it("does not print an error again under the chat bubble that shows it", () => {
    expect(cells[13].status).toBe("ok");
    expect(cells[14].status).toBe("error");
    expect(lastChat(cells[14])).toMatchObject({ state: "error", error: { name: "ModelNotLoadedError" } });
    expect(cells[14].stream).toBe("");
  });
});
