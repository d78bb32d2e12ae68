// Awaiting a chat in a notebook: the reply streams into one chat widget, updated in place.
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { WorkerError } from "../bridge/errors";
import { CHAT_MIME, type ChatBundle } from "../display/bundles";
import { recordingSink, type RecordedDisplay, type RecordingSink } from "../display/testutil";
import { ChatRequest, type ChatIO, type ChatSettings, type ChatTarget } from "./chat";
import { Conversation, type MessageRunner } from "./conversation";
import { Reply } from "./reply";
import type { ChatMessage } from "./types";

function reply(text: string, tokens: number, finishReason: Reply["finishReason"] = "stop"): Reply {
  return new Reply({
    text, finishReason, promptTokens: 7, completionTokens: tokens, ttftMs: 12, durationMs: 250,
    tokensPerSecond: 40, tokenIds: [], model: "m",
  });
}

/** A model that announces its request, then streams `pieces` one token each, `gapMs` apart. */
function model(pieces: string[], options: { gapMs?: number; end?: (text: string, tokens: number) => Reply } = {}) {
  const sent: ChatMessage[][] = [];
  const runner: MessageRunner & { sink: () => RecordingSink } = {
    id: "tiny:fp32:cpu",
    sink: () => sink,
    async generate(messages: ChatMessage[], _s: Readonly<ChatSettings>, io: ChatIO) {
      sent.push(messages);
      io.onStart?.({ model: "tiny:fp32:cpu", messages });
      let text = "";
      for (const [i, p] of pieces.entries()) {
        await new Promise((r) => setTimeout(r, options.gapMs ?? 1));
        text += p;
        io.onText?.(p, i + 1);
      }
      return (options.end ?? ((t, n) => reply(t, n)))(text, pieces.length);
    },
  };
  return { runner, sent };
}

function chatOf(d: RecordedDisplay): ChatBundle {
  return d.data[CHAT_MIME] as ChatBundle;
}

function chatTarget(runner: MessageRunner): ChatTarget {
  return {
    label: runner.id,
    sink: runner.sink,
    run: (p, settings, io) => runner.generate([{ role: "user", content: p }], settings, io),
  };
}

let sink: RecordingSink;
beforeEach(() => {
  sink = recordingSink({ rich: true });
});
afterEach(() => {
  vi.useRealTimers();
});

describe("a chat awaited in a notebook", () => {
  it("shows the widget generating, updates that same output, and ends done with the reply's stats", async () => {
    const { runner } = model(["你", "好", "！"]);
    const r = await new ChatRequest(chatTarget(runner), "hi");
    const [first, ...rest] = sink.displays;
    expect(first.update).toBe(false);
    expect(first.id).toMatch(/^[0-9a-f-]{36}$/);
    expect(chatOf(first)).toEqual({
      version: 1,
      model: "tiny:fp32:cpu",
      state: "generating",
      messages: [{ role: "user", content: "hi" }, { role: "assistant", content: "" }],
      stats: { completionTokens: 0 },
    });
    expect(rest.length).toBeGreaterThan(0);
    expect(rest.every((d) => d.update && d.id === first.id)).toBe(true);
    const last = chatOf(rest[rest.length - 1]);
    expect(last.state).toBe("done");
    expect(last.messages[1]).toEqual({ role: "assistant", content: "你好！" });
    expect(last.stats).toEqual({
      completionTokens: 3, promptTokens: 7, ttftMs: 12, durationMs: 250, tokensPerSecond: 40, finishReason: "stop",
    });
    // Front ends without the extension read the transcript as text.
    expect(rest[rest.length - 1].data["text/plain"]).toContain("assistant: 你好！");
    expect(String(r)).toBe("你好！");
    // The widget replaces the streamed text; nothing is printed beside it.
    expect(sink.texts).toEqual([]);
    expect(sink.pins).toBe(1);
  });

  it("reports the token count so far while generating", async () => {
    const { runner } = model(["a", "b", "c", "d"], { gapMs: 60 });
    await new ChatRequest(chatTarget(runner), "hi");
    const generating = sink.displays.map(chatOf).filter((b) => b.state === "generating");
    expect(generating.map((b) => [b.messages[1].content, b.stats?.completionTokens])).toEqual([
      ["", 0],
      ["a", 1],
      ["ab", 2],
      ["abc", 3],
      ["abcd", 4],
    ]);
  });

  it("sends at most one update per 50 ms however fast tokens come, and always the final one", async () => {
    vi.useFakeTimers();
    // 200 tokens a second for one second.
    const { runner } = model(Array.from({ length: 200 }, (_, i) => `${i} `), { gapMs: 5 });
    const pending = new ChatRequest(chatTarget(runner), "hi").then((x) => x);
    await vi.advanceTimersByTimeAsync(2000);
    const r = await pending;
    const updates = sink.displays.slice(1);
    const gaps = updates.slice(1, -1).map((d, i) => d.at - updates[i].at);
    expect(Math.min(...gaps)).toBeGreaterThanOrEqual(50);
    expect(updates.length).toBeLessThanOrEqual(1000 / 50 + 2);
    expect(chatOf(updates[updates.length - 1])).toMatchObject({ state: "done", stats: { completionTokens: 200 } });
    expect(chatOf(updates[updates.length - 1]).messages[1].content).toBe(r.text);
  });

  it("ends cancelled with the partial reply when interrupted", async () => {
    const { runner } = model(["Once", " upon"], { end: (t, n) => reply(t, n, "cancelled") });
    const r = await new ChatRequest(chatTarget(runner), "story");
    expect(r.cancelled).toBe(true);
    const last = chatOf(sink.displays[sink.displays.length - 1]);
    expect(last).toMatchObject({ state: "cancelled", stats: { completionTokens: 2, finishReason: "cancelled" } });
    expect(last.messages[1].content).toBe("Once upon");
    expect(sink.texts).toEqual([]);
  });

  it("ends in the error state with the text so far, and the awaited promise still rejects", async () => {
    const failure = new WorkerError("generate", "OutOfMemoryError", "CUDA out of memory", []);
    const { runner } = model(["par", "tial"], {
      end: () => {
        throw failure;
      },
    });
    await expect(new ChatRequest(chatTarget(runner), "hi")).rejects.toBe(failure);
    const last = sink.displays[sink.displays.length - 1];
    expect(last.update).toBe(true);
    expect(chatOf(last)).toMatchObject({
      state: "error",
      messages: [{ role: "user", content: "hi" }, { role: "assistant", content: "partial" }],
      error: { name: "OutOfMemoryError", message: "CUDA out of memory", hint: expect.stringContaining("fewer tokens") },
    });
    expect(last.data["text/plain"]).toContain("OutOfMemoryError: CUDA out of memory");
  });

  it("shows nothing for an error raised before the request went out; the promise rejects", async () => {
    const target: ChatTarget = { label: "m", sink: () => sink, run: async () => Promise.reject(new Error("no worker")) };
    await expect(new ChatRequest(target, "hi")).rejects.toThrow("no worker");
    expect(sink.displays).toEqual([]);
    expect(sink.texts).toEqual([]);
  });

  it("emits nothing at all when quiet", async () => {
    const { runner } = model(["a", "b"]);
    expect(String(await new ChatRequest(chatTarget(runner), "hi").quiet())).toBe("ab");
    expect(sink.displays).toEqual([]);
    expect(sink.texts).toEqual([]);
  });

  it("shows the prompt alone for a target that does not announce its request", async () => {
    const target: ChatTarget = { label: "m", sink: () => sink, run: async (_p, _s, io) => (io.onText?.("ok"), reply("ok", 1)) };
    await new ChatRequest(target, "hi");
    expect(chatOf(sink.displays[0]).messages).toEqual([{ role: "user", content: "hi" }, { role: "assistant", content: "" }]);
    expect(chatOf(sink.displays[sink.displays.length - 1])).toMatchObject({ state: "done", messages: [{}, { content: "ok" }] });
  });

  it("draws a conversation's turn as the new messages, with the history it sent folded into earlier", async () => {
    let n = 0;
    const { runner } = model([], { end: () => reply(`answer ${++n}`, 2) });
    const talk = new Conversation(runner, { system: "Be kind." });
    await talk.say("one");
    const before = sink.displays.length;
    await talk.say("two");
    const turn2 = sink.displays.slice(before);
    expect(chatOf(turn2[0]).messages).toEqual([
      { role: "user", content: "two" },
      { role: "assistant", content: "" },
    ]);
    expect(chatOf(turn2[0]).earlier).toEqual([
      { role: "system", content: "Be kind." },
      { role: "user", content: "one" },
      { role: "assistant", content: "answer 1" },
    ]);
    expect(chatOf(turn2[turn2.length - 1])).toMatchObject({ state: "done" });
    expect(chatOf(turn2[turn2.length - 1]).messages[1]).toEqual({ role: "assistant", content: "answer 2" });
    expect(new Set(turn2.map((d) => d.id)).size).toBe(1);
    expect(turn2[0].id).not.toBe(sink.displays[0].id);
  });

  it("streams plain text instead where the sink cannot draw widgets", async () => {
    const terminal = recordingSink({ rich: false });
    const { runner } = model(["Hel", "lo"]);
    const target: ChatTarget = { ...chatTarget(runner), sink: () => terminal };
    await new ChatRequest(target, "hi");
    expect(terminal.displays).toEqual([]);
    expect(terminal.texts).toEqual(["Hel", "lo", "\n"]);
  });
});

describe("a thinking, tool-calling reply in the widget", () => {
  /** A model that thinks in `thoughts`, answers `pieces`, then calls weather(Paris). */
  function thinker(thoughts: string[], pieces: string[]): MessageRunner & { sink: () => RecordingSink } {
    return {
      id: "tiny-qwen3",
      sink: () => sink,
      async generate(messages: ChatMessage[], _s: Readonly<ChatSettings>, io: ChatIO) {
        io.onStart?.({ model: "tiny-qwen3", messages });
        let n = 0;
        for (const t of thoughts) io.onReasoning?.(t, ++n);
        for (const p of pieces) io.onText?.(p, ++n);
        io.onToolCall?.({ id: "call_1", name: "weather", arguments: { city: "Paris" } });
        return new Reply({
          text: pieces.join(""), reasoning: thoughts.join(""), reasoningTokens: thoughts.length, reasoningMs: 1500,
          toolCalls: [{ id: "call_1", name: "weather", arguments: { city: "Paris" } }], finishReason: "tool_calls",
          promptTokens: 7, completionTokens: n, ttftMs: 12, durationMs: 250, tokensPerSecond: 40, tokenIds: [], model: "tiny-qwen3",
        });
      },
    };
  }

  it("streams the reasoning apart from the answer and ends with the call as a card, not tags", async () => {
    const r = await new ChatRequest(chatTarget(thinker(["Need ", "weather."], ["Checking."])), "Weather?");
    expect(r.finishReason).toBe("tool_calls");
    const views = sink.displays.map(chatOf);
    // While thinking, the reply has reasoning and no answer yet.
    expect(views.some((v) => v.state === "generating" && v.messages[1].reasoning === "Need " && v.messages[1].content === "")).toBe(true);
    const last = views[views.length - 1];
    expect(last.messages[1]).toEqual({
      role: "assistant", content: "Checking.", reasoning: "Need weather.", reasoningTokens: 2, reasoningMs: 1500,
      toolCalls: [{ name: "weather", arguments: { city: "Paris" } }],
    });
    expect(last.stats?.finishReason).toBe("tool_calls");
    const plain = sink.displays[sink.displays.length - 1].data["text/plain"] as string;
    expect(plain).toContain("assistant (thinking, 2 tokens, 1.5 s): Need weather.");
    expect(plain).toContain('assistant calls weather({"city":"Paris"})');
    expect(plain).not.toContain("<tool_call>");
  });

  it("marks where the thinking ends and shows calls in a terminal", async () => {
    const text = recordingSink({ rich: false });
    const runner = { ...thinker(["Need weather."], ["Checking."]), sink: () => text };
    await new ChatRequest(chatTarget(runner), "Weather?");
    expect(text.texts.join("")).toBe('[thinking]\nNeed weather.\n[/thinking]\nChecking.\n[tool call] weather({"city":"Paris"})\n');
  });
});
