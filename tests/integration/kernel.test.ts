// The "Qwen (TypeScript)" kernel, started by Jupyter's own client from its kernelspec, in a folder
// outside the repo: `qwenbook` imports (types and runtime), replies stream into the chat widget,
// the interrupt button cancels, the memory gauge shows numbers, and rich outputs reach Jupyter as
// display_data updated in place by display id.
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CHAT_MIME, GPU_MIME, type ChatBundle, type GpuBundle } from "../../kernel/src/display/bundles";
import { Qwen } from "../../kernel/src/index";
import { privateRuntimeDir, repo, runCli, tinyModel } from "./helpers";
import { drive as driveKernel, type CellCode, type CellResult } from "./kernel-harness";


const prefix = mkdtempSync(join(tmpdir(), "qwenbook-kernel-prefix-"));
const notebookDir = mkdtempSync(join(tmpdir(), "qwenbook-notebook-"));
let cells: CellResult[];

/**
 * The states of the widget of one MIME type in a cell, checked to be one output shown once (maybe
 * first as a text placeholder) and then updated in place.
 */
function widget<T>(cell: CellResult, mime: string): T[] {
  const id = cell.displays.find((d) => mime in d.data)?.display_id;
  expect(id).toEqual(expect.any(String));
  const [first, ...updates] = cell.displays.filter((d) => d.display_id === id);
  expect(first.msg_type).toBe("display_data");
  for (const u of updates) expect(u.msg_type).toBe("update_display_data");
  // Every output carries a text/plain form for front ends without the extension.
  for (const d of [first, ...updates]) expect(d.data["text/plain"]).toEqual(expect.any(String));
  return [first, ...updates].filter((d) => mime in d.data).map((d) => d.data[mime] as T);
}

const drive = (code: CellCode[]): Promise<CellResult[]> => driveKernel(prefix, notebookDir, code);

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
        "kept: done.text.length > 0 && talk.history[1].content === done.text, text: done.text })",
    },
    // A top-level for-await, which tslab alone would run outside an async function.
    { code: 'const pieces: string[] = [];\nfor await (const p of m.chat("count to five").greedy().maxTokens(5).stream()) pieces.push(p);\npieces.length' },
    // A gauge on its own shows the current numbers; one beside a request stays live while it runs.
    { code: "qwen.gpu();" },
    { code: 'const gauge = qwen.gpu();\nawait m.chat("Tell me a story.").greedy().maxTokens(128).quiet();\ngauge.live' },
    { code: "await qwen.gpu().watch(2);" },
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

  it("streams the reply into one chat widget, which is the awaited value's only rendering", () => {
    const { stream, errors } = cells[1];
    expect(errors).toEqual([]);
    const chat = widget<ChatBundle>(cells[1], CHAT_MIME);
    expect(chat[0]).toMatchObject({
      state: "generating",
      model: expect.stringMatching(/^tiny-qwen2:/),
      messages: [{ role: "user", content: "你好，你是谁？" }, { role: "assistant", content: "" }],
    });
    expect(chat.length).toBeGreaterThan(1);
    const last = chat[chat.length - 1];
    expect(last).toMatchObject({ state: "done", stats: { completionTokens: 12, finishReason: "length" } });
    expect(last.stats?.tokensPerSecond).toBeGreaterThan(0);
    const text = last.messages[1].content;
    expect(text.length).toBeGreaterThan(0);
    expect(chat.slice(0, -1).every((b) => b.state === "generating" && text.startsWith(b.messages[1].content))).toBe(true);
    const plain = cells[1].displays[cells[1].displays.length - 1].data["text/plain"];
    expect(plain).toContain(`assistant: ${text}`);
    // The widget is the reply's only rendering: the cell prints neither its text nor a summary.
    expect(stream).toBe("");
  });

  it("type-checks against the package's real types", () => {
    expect(cells[2].status).toBe("error");
    expect(cells[2].stream + JSON.stringify(cells[2].errors)).toMatch(/Type 'number' is not assignable to type 'string'/);
  });

  it("cancels the running generation on interrupt and keeps the partial reply in the history", () => {
    expect(cells[3].status).toBe("ok");
    expect(cells[4].status).toBe("error");
    // The widget's "cancelled" state is the message; no error is printed under it.
    expect(cells[4].stream).toBe("");
    const state = JSON.parse(cells[5].stream.trim().split("\n").pop()!) as {
      finish: string;
      tokens: number;
      turns: number;
      kept: boolean;
      text: string;
    };
    expect(state).toMatchObject({ finish: "cancelled", turns: 2, kept: true });
    expect(state.tokens).toBeLessThan(3000);
    // The rest of the reply reaches the interrupted cell's widget, which ends cancelled.
    const chat = widget<ChatBundle>(cells[4], CHAT_MIME);
    expect(chat[chat.length - 1]).toMatchObject({
      state: "cancelled",
      messages: [{ role: "user", content: "Tell me a very long story." }, { role: "assistant", content: state.text }],
      stats: { completionTokens: state.tokens, finishReason: "cancelled" },
    });
    expect(cells[5].displays).toEqual([]);
  });

  it("runs a cell with a top-level for-await over a reply stream", () => {
    expect(cells[6].status, cells[6].stream).toBe("ok");
    expect(Number(cells[6].stream.trim())).toBeGreaterThan(0);
  });

  it("shows the worker's memory in a gauge with numbers, ending not live", () => {
    expect(cells[7].errors).toEqual([]);
    // The gauge holds its place with a line of text until the worker's numbers arrive.
    expect(cells[7].displays[0]).toMatchObject({ msg_type: "display_data", data: { "text/plain": "GPU memory: asking the worker…" } });
    const gauge = widget<GpuBundle>(cells[7], GPU_MIME);
    const device = gauge[0].devices[0];
    // This worker runs on the CPU: the gauge shows its process RAM against the machine's.
    expect(device).toMatchObject({ device: "cpu", kind: "cpu" });
    expect(device.used).toBeGreaterThan(0);
    expect(device.total).toBeGreaterThan(device.used);
    expect(gauge[gauge.length - 1].live).toBe(false);
    // The gauge is the cell's output; the gauge object left as the last value is not printed under it.
    expect(cells[7].stream.trim()).toBe("");
  });

  it("keeps the gauge live while a request runs in its cell, fed by the worker's broadcasts", () => {
    expect(cells[8].errors).toEqual([]);
    // Awaited in the cell, the request ended while the gauge was still live.
    expect(cells[8].stream.trim()).toBe("true");
    const gauge = widget<GpuBundle>(cells[8], GPU_MIME);
    expect(gauge.slice(0, -1).every((b) => b.live)).toBe(true);
    const last = gauge[gauge.length - 1];
    expect(last.live).toBe(false);
    // The snapshot at the start, any samples broadcast while it generated, and one as the work left memory.
    expect(last.devices[0].history!.length).toBeGreaterThan(1);
  });

  it("keeps a watched gauge updating for the time asked, and awaiting it waits that long", () => {
    expect(cells[9].errors).toEqual([]);
    expect(cells[9].stream).toBe("");
    const gauge = widget<GpuBundle>(cells[9], GPU_MIME);
    // One sample at the start and one each second after, from an idle worker that is asked for them.
    expect(gauge[gauge.length - 1].devices[0].history!.length).toBeGreaterThanOrEqual(3);
    expect(gauge[gauge.length - 1].live).toBe(false);
  });

  it("sends rich outputs as display_data and updates them in place by display id", () => {
    expect(cells[10].errors).toEqual([]);
    expect(cells[10].displays).toEqual([
      { msg_type: "display_data", data: { "text/plain": "v1", "application/vnd.qwenbook.test+json": { v: 1 } }, display_id: "d1" },
      { msg_type: "update_display_data", data: { "text/plain": "v2" }, display_id: "d1" },
    ]);
  });

  it("leaves the worker and its model running after the kernel has exited, for the next kernel", async () => {
    const status = await new Qwen().status();
    expect(status.models.map((m) => m.id)).toEqual([expect.stringMatching(/^tiny-qwen2:/)]);
  });
});
