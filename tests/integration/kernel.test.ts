// The "Qwen (TypeScript)" kernel, started by Jupyter's own client from its kernelspec, in a folder
// outside the repo: `qwenbook` imports (types and runtime), replies stream into the cell, the
// interrupt button cancels, and rich outputs reach Jupyter as display_data.
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Qwen } from "../../kernel/src/index";
import { privateRuntimeDir, python, repo, runCli, tinyModel } from "./helpers";

interface CellResult {
  status: string;
  stream: string;
  errors: { ename: string; evalue: string }[];
  displays: { msg_type: string; data: Record<string, unknown>; display_id: string | null }[];
}

const prefix = mkdtempSync(join(tmpdir(), "qwenbook-kernel-prefix-"));
const notebookDir = mkdtempSync(join(tmpdir(), "qwenbook-notebook-"));
let cells: CellResult[];

function drive(code: { code: string; interrupt_after_output?: boolean }[]): Promise<CellResult[]> {
  return new Promise((resolve, reject) => {
    const child = spawn(python, [join(repo, "tests", "integration", "kernel_driver.py"), "qwen-ts", notebookDir, JSON.stringify(code)], {
      env: { ...process.env, JUPYTER_PATH: join(prefix, "share", "jupyter") },
    });
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => (out += d));
    child.stderr.on("data", (d: Buffer) => (err += d));
    child.once("exit", (status) => {
      if (status !== 0) reject(new Error(`kernel_driver.py exited with ${status}:\n${err}`));
      else resolve(JSON.parse(out.trim().split("\n").pop()!) as CellResult[]);
    });
  });
}

beforeAll(async () => {
  privateRuntimeDir("kernel");
  const install = runCli("kernelspec", "install", "--prefix", prefix);
  expect(install.status, install.stderr).toBe(0);
  const tiny = JSON.stringify(tinyModel());
  cells = await drive([
    { code: `import { qwen } from "qwenbook";\nconst m = await qwen.load(${tiny}, { quiet: true });\nm.id` },
    { code: 'const reply = await m.chat("你好，你是谁？").greedy().maxTokens(12);\nreply' },
    { code: "const wrong: string = reply.completionTokens;" },
    // Declared in its own cell: tslab drops the declarations of a cell that fails or is interrupted.
    { code: 'const talk = m.conversation();\nlet turn: PromiseLike<import("qwenbook").Reply> | undefined;' },
    {
      code: 'turn = talk.say("Tell me a very long story.").greedy().maxTokens(3000);\nawait turn;',
      interrupt_after_output: true,
    },
    {
      code:
        "const done = await turn!;\n" +
        "JSON.stringify({ finish: done.finishReason, tokens: done.completionTokens, turns: talk.history.length, " +
        "kept: done.text.length > 0 && talk.history[1].content === done.text })",
    },
    // A top-level for-await, which tslab alone would run outside an async function.
    { code: 'const pieces: string[] = [];\nfor await (const p of m.chat("count to five").greedy().maxTokens(5).stream()) pieces.push(p);\npieces.length' },
    {
      code:
        'const sink = (globalThis as any)[Symbol.for("qwenbook.display")];\n' +
        'sink.display({ data: { "text/plain": "v1", "application/vnd.qwenbook.test+json": { v: 1 } } }, { id: "d1" });\n' +
        'sink.display({ data: { "text/plain": "v2" } }, { id: "d1", update: true });',
    },
  ]);
});

afterAll(async () => {
  await new Qwen().shutdown();
});


describe("the Qwen (TypeScript) kernel", () => {
  it("is installed as a kernelspec that runs the launcher with this Node", () => {
    const spec = JSON.parse(readFileSync(join(prefix, "share", "jupyter", "kernels", "qwen-ts", "kernel.json"), "utf8")) as {
      argv: string[];
      display_name: string;
    };
    expect(spec.display_name).toBe("Qwen (TypeScript)");
    expect(spec.argv.slice(0, 2)).toEqual([process.execPath, join(repo, "kernel", "dist", "kernelspec", "launch.js")]);
    expect(runCli("kernelspec", "install", "--prefix", prefix).stdout).toMatch(/already installed/);
  });

  it("imports qwenbook in a folder outside the repo and loads a model", () => {
    expect(cells[0].errors).toEqual([]);
    expect(cells[0].stream.trim()).toMatch(/^tiny-qwen2:/);
  });

  it("streams the reply into the cell and shows the awaited value as a one-line summary", () => {
    const { stream, errors } = cells[1];
    expect(errors).toEqual([]);
    const [text, summary] = stream.split(/\n(?=Reply\()/);
    expect(summary.trim()).toMatch(/^Reply\(12 tokens, length, [\d.]+ tok\/s\)$/);
    expect(text.length).toBeGreaterThan(0);
    expect(stream.split(text).length - 1).toBe(1);
  });

  it("type-checks against the package's real types", () => {
    expect(cells[2].status).toBe("error");
    expect(cells[2].stream + JSON.stringify(cells[2].errors)).toMatch(/Type 'number' is not assignable to type 'string'/);
  });

  it("cancels the running generation on interrupt and keeps the partial reply in the history", () => {
    expect(cells[3].status).toBe("ok");
    expect(cells[4].status).toBe("error");
    expect(cells[4].stream).toContain("Interrupted");
    // The rest of the reply, and the note that it was cancelled, stay in the interrupted cell.
    expect(cells[4].stream).toMatch(/\[cancelled after \d+ tokens\]\n$/);
    expect(cells[5].stream).not.toContain("cancelled after");
    const state = JSON.parse(cells[5].stream.trim().split("\n").pop()!) as { finish: string; tokens: number; turns: number; kept: boolean };
    expect(state).toMatchObject({ finish: "cancelled", turns: 2, kept: true });
    expect(state.tokens).toBeLessThan(3000);
  });

  it("runs a cell with a top-level for-await over a reply stream", () => {
    expect(cells[6].status, cells[6].stream).toBe("ok");
    expect(Number(cells[6].stream.trim())).toBeGreaterThan(0);
  });

  it("sends rich outputs as display_data and updates them in place by display id", () => {
    expect(cells[7].errors).toEqual([]);
    expect(cells[7].displays).toEqual([
      { msg_type: "display_data", data: { "text/plain": "v1", "application/vnd.qwenbook.test+json": { v: 1 } }, display_id: "d1" },
      { msg_type: "update_display_data", data: { "text/plain": "v2" }, display_id: "d1" },
    ]);
  });

  it("leaves the worker and its model running after the kernel has exited, for the next kernel", async () => {
    const status = await new Qwen().status();
    expect(status.models.map((m) => m.id)).toEqual([expect.stringMatching(/^tiny-qwen2:/)]);
  });
});
