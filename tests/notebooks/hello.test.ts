import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { cellWith, chatOutputs, errorsOf, executeNotebook, jsonOf, repo, streamText } from "./notebook-runner";

afterAll(() => {
  spawnSync("node", [join(repo, "kernel", "dist", "cli", "main.js"), "worker", "stop"], { stdio: "inherit" });
});

describe("notebooks/00-hello.ipynb", () => {
  const nb = executeNotebook("00-hello.ipynb", { QWENBOOK_MODEL: process.env.QWENBOOK_TINY_MODEL ?? "" });

  it("runs top to bottom without errors", () => {
    expect(errorsOf(nb), nb.stderr).toEqual([]);
    expect(nb.status).toBe(0);
  });

  it("streamed the reply into the chat widget, and the awaited value is that reply", () => {
    const chat = cellWith(nb, 'm.chat("你好，你是谁？")');
    const printed = jsonOf<{ text: string; tokens: number; finish: string }>(cellWith(nb, "JSON.stringify({ text: String(reply)"));
    expect(printed.tokens).toBeGreaterThan(0);
    expect(printed.text.length).toBeGreaterThan(0);
    // The saved notebook holds the widget's final state (nbclient applies update_display_data).
    const [widget, ...more] = chatOutputs(chat);
    expect(more).toEqual([]);
    expect(widget.chat).toMatchObject({
      state: "done",
      messages: [
        { role: "system", content: "You are a helpful assistant." },
        { role: "user", content: "你好，你是谁？" },
        { role: "assistant", content: printed.text },
      ],
      stats: { completionTokens: printed.tokens, finishReason: printed.finish },
    });
    expect(widget.plain).toContain(printed.text);
    // The widget is the reply's only rendering: no streamed copy of the text beside it.
    expect(streamText(chat)).not.toContain(printed.text);
  });

  it("kept the conversation history and streamed pieces in code", () => {
    expect(jsonOf<{ turns: number }>(cellWith(nb, "talk.history.length")).turns).toBe(5);
    // One widget per turn; the second shows its own turn, with the first folded behind it as history.
    const turns = chatOutputs(cellWith(nb, "talk.history.length")).map((w) => w.chat);
    expect(turns.map((t) => t.state)).toEqual(["done", "done"]);
    expect(turns[1].earlier).toEqual(turns[0].messages);
    expect(turns[1].messages.map((m) => m.role)).toEqual(["user", "assistant"]);
    expect(jsonOf<{ pieces: number }>(cellWith(nb, "pieces += 1")).pieces).toBeGreaterThan(0);
  });
});
