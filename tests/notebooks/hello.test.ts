import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { cellWith, errorsOf, executeNotebook, jsonOf, repo, streamText } from "./notebook-runner";

afterAll(() => {
  spawnSync("node", [join(repo, "kernel", "dist", "cli", "main.js"), "worker", "stop"], { stdio: "inherit" });
});

describe("notebooks/00-hello.ipynb", () => {
  const nb = executeNotebook("00-hello.ipynb", { QWENBOOK_MODEL: process.env.QWENBOOK_TINY_MODEL ?? "" });

  it("runs top to bottom without errors", () => {
    expect(errorsOf(nb), nb.stderr).toEqual([]);
    expect(nb.status).toBe(0);
  });

  it("streamed the reply into the chat cell, and the awaited value is that reply", () => {
    const chat = cellWith(nb, 'm.chat("你好，你是谁？")');
    const printed = jsonOf<{ text: string; tokens: number; finish: string }>(cellWith(nb, "JSON.stringify({ text: String(reply)"));
    expect(printed.tokens).toBeGreaterThan(0);
    expect(printed.text.length).toBeGreaterThan(0);
    expect(streamText(chat)).toContain(printed.text);
    // tslab prints a cell's last value; the reply must not appear a second time
    expect(streamText(chat).split(printed.text).length - 1).toBe(1);
  });

  it("kept the conversation history and streamed pieces in code", () => {
    expect(jsonOf<{ turns: number }>(cellWith(nb, "talk.history.length")).turns).toBe(5);
    expect(jsonOf<{ pieces: number }>(cellWith(nb, "pieces += 1")).pieces).toBeGreaterThan(0);
  });
});
