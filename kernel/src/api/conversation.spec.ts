import { inspect } from "node:util";
import { describe, expect, it } from "vitest";
import type { ChatIO, ChatSettings } from "./chat";
import { Conversation, type MessageRunner } from "./conversation";
import { Reply } from "./reply";
import type { ChatMessage } from "./types";

function runner(answer: (messages: ChatMessage[]) => Reply | Promise<Reply>) {
  const sent: ChatMessage[][] = [];
  const model: MessageRunner = {
    id: "m",
    async generate(messages: ChatMessage[], _s: Readonly<ChatSettings>, _io: ChatIO) {
      sent.push(messages.map((x) => ({ ...x })));
      return answer(messages);
    },
  };
  return { model, sent };
}

const reply = (text: string, finishReason: Reply["finishReason"] = "stop") =>
  new Reply({ text, finishReason, promptTokens: 1, completionTokens: 1, ttftMs: 1, durationMs: 1, tokensPerSecond: 1, tokenIds: [], model: "m" });

describe("Conversation", () => {
  it("sends the system prompt and the whole history with each message, and keeps the replies", async () => {
    let n = 0;
    const { model, sent } = runner(() => reply(`answer ${++n}`));
    const talk = new Conversation(model, { system: "Be kind." });
    await talk.say("My name is Lin.").quiet();
    await talk.say("What is my name?").quiet();
    expect(sent[1]).toEqual([
      { role: "system", content: "Be kind." },
      { role: "user", content: "My name is Lin." },
      { role: "assistant", content: "answer 1" },
      { role: "user", content: "What is my name?" },
    ]);
    expect(talk.history).toEqual([...sent[1], { role: "assistant", content: "answer 2" }]);
    expect(String(talk)).toBe("Conversation(m, 2 turns, with system prompt)");
    expect(inspect(talk)).toBe(String(talk));
  });

  it("keeps a partial reply when the turn was cancelled", async () => {
    const talk = new Conversation(runner(() => reply("half an", "cancelled")).model);
    const r = await talk.say("Tell me a story").quiet();
    expect(r.cancelled).toBe(true);
    expect(talk.history).toEqual([
      { role: "user", content: "Tell me a story" },
      { role: "assistant", content: "half an" },
    ]);
  });

  it("leaves the history unchanged when a turn fails", async () => {
    const talk = new Conversation(runner(() => Promise.reject(new Error("boom"))).model);
    await expect(talk.say("hi").quiet()).rejects.toThrow("boom");
    expect(talk.history).toEqual([]);
  });

  it("refuses a second message while the first is being answered", async () => {
    let release: (() => void) | undefined;
    const talk = new Conversation(runner(() => new Promise<Reply>((r) => (release = () => r(reply("ok"))))).model);
    const first = talk.say("one").quiet().then((x) => x);
    await new Promise((r) => setTimeout(r, 0));
    await expect(talk.say("two").quiet()).rejects.toThrow(/still answering the previous message/);
    release!();
    await first;
    expect(talk.history.map((m) => m.content)).toEqual(["one", "ok"]);
  });

  it("does not let callers change the history through the returned copy", async () => {
    const talk = new Conversation(runner(() => reply("a")).model);
    await talk.say("q").quiet();
    talk.history.length = 0;
    talk.history[0].content = "changed";
    expect(talk.history).toEqual([
      { role: "user", content: "q" },
      { role: "assistant", content: "a" },
    ]);
  });

  it("lets one say() use its own system prompt without changing the conversation's", async () => {
    const { model, sent } = runner(() => reply("ok"));
    const talk = new Conversation(model, { system: "A" });
    await talk.say("hi").system("B").quiet();
    expect(sent[0][0]).toEqual({ role: "system", content: "B" });
    expect(talk.history[0]).toEqual({ role: "system", content: "A" });
  });
});
