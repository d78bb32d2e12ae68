// What a conversation's say() cells show in a notebook: the new turn, with the turns before it
// folded away in the bundle's `earlier`, so the third cell does not draw the first exchange again.
import Ajv2020 from "ajv/dist/2020";
import { beforeEach, describe, expect, it } from "vitest";
import { resolvedBundlesSchema } from "../../scripts/gen-protocol.mjs";
import { CHAT_MIME, type ChatBundle } from "../display/bundles";
import { recordingSink, type RecordedDisplay, type RecordingSink } from "../display/testutil";
import type { ChatIO, ChatSettings } from "./chat";
import { Conversation, type MessageRunner } from "./conversation";
import { Reply } from "./reply";
import type { ChatMessage } from "./types";

const schema = resolvedBundlesSchema();
const validChat = new Ajv2020({ strict: false }).addSchema(schema).compile({ $ref: `${schema.$id}#/$defs/ChatBundle` });

let sink: RecordingSink;
beforeEach(() => {
  sink = recordingSink({ rich: true });
});

/** A model that announces each request, streams one piece and answers "answer N" for the Nth turn. */
function runner(): { model: MessageRunner; sent: ChatMessage[][] } {
  const sent: ChatMessage[][] = [];
  const model: MessageRunner = {
    id: "tiny",
    sink: () => sink,
    async generate(messages: ChatMessage[], _s: Readonly<ChatSettings>, io: ChatIO) {
      sent.push(messages.map((m) => ({ ...m })));
      io.onStart?.({ model: "tiny", messages });
      const text = `answer ${sent.length}`;
      io.onText?.(text, 1);
      return new Reply({
        text, finishReason: "stop", promptTokens: 3, completionTokens: 1, ttftMs: 1, durationMs: 2,
        tokensPerSecond: 1, tokenIds: [], model: "tiny",
      });
    },
  };
  return { model, sent };
}

/** The displays of each say() in order: one display id per turn. */
function turns(displays: RecordedDisplay[]): RecordedDisplay[][] {
  const byId = new Map<string | undefined, RecordedDisplay[]>();
  for (const d of displays) byId.set(d.id, [...(byId.get(d.id) ?? []), d]);
  return [...byId.values()];
}

const chat = (d: RecordedDisplay): ChatBundle => d.data[CHAT_MIME] as ChatBundle;
const last = <T>(xs: T[]): T => xs[xs.length - 1];

describe("a conversation's say() in a notebook", () => {
  it("shows the third turn's question and reply as its messages, the first two exchanges folded into earlier", async () => {
    const { model, sent } = runner();
    const talk = new Conversation(model);
    await talk.say("My name is Lin.");
    await talk.say("What is two plus two?");
    await talk.say("What is my name?");
    const third = turns(sink.displays)[2];
    expect(third.length).toBeGreaterThan(1);
    const opening = chat(third[0]);
    expect(opening.messages).toEqual([
      { role: "user", content: "What is my name?" },
      { role: "assistant", content: "" },
    ]);
    const done = chat(last(third));
    expect(done.state).toBe("done");
    expect(done.messages).toEqual([
      { role: "user", content: "What is my name?" },
      { role: "assistant", content: "answer 3" },
    ]);
    expect(done.earlier).toEqual([
      { role: "user", content: "My name is Lin." },
      { role: "assistant", content: "answer 1" },
      { role: "user", content: "What is two plus two?" },
      { role: "assistant", content: "answer 2" },
    ]);
    // The model still got the whole history: only the drawing changed.
    expect(sent[2].map((m) => m.content)).toEqual(["My name is Lin.", "answer 1", "What is two plus two?", "answer 2", "What is my name?"]);
    for (const d of third) expect(validChat(chat(d)), JSON.stringify(validChat.errors)).toBe(true);
  });

  it("puts the new turn alone in text/plain and text/html, with the count of earlier turns", async () => {
    const talk = new Conversation(runner().model);
    await talk.say("My name is Lin.");
    const first = last(turns(sink.displays)[0]).data;
    expect(first["text/plain"]).toMatch(/^user: My name is Lin\.\nassistant: answer 1\n/);
    expect(first["text/plain"]).not.toMatch(/earlier/);
    await talk.say("What is two plus two?");
    await talk.say("What is my name?");
    const data = last(turns(sink.displays)[2]).data;
    const text = data["text/plain"] as string;
    expect(text).toMatch(/^\(2 earlier turns\)\nuser: What is my name\?\nassistant: answer 3\n/);
    expect(text).not.toContain("My name is Lin.");
    expect(data["text/html"]).toContain("2 earlier turns");
    expect(data["text/html"]).not.toContain("My name is Lin.");
    await talk.say("And again?");
    expect(last(turns(sink.displays)[3]).data["text/plain"]).toMatch(/^\(3 earlier turns\)\n/);
  });

  it("shows the system prompt with the first turn, then folds it with the earlier turns", async () => {
    const talk = new Conversation(runner().model, { system: "Be kind." });
    await talk.say("one");
    await talk.say("two");
    const [first, second] = turns(sink.displays).map((t) => chat(last(t)));
    expect(first.messages.map((m) => m.role)).toEqual(["system", "user", "assistant"]);
    expect(first.earlier).toBeUndefined();
    expect(second.messages).toEqual([
      { role: "user", content: "two" },
      { role: "assistant", content: "answer 2" },
    ]);
    expect(second.earlier?.[0]).toEqual({ role: "system", content: "Be kind." });
  });

  it("shows a system prompt a say() sets for itself, since no earlier turn showed it", async () => {
    const talk = new Conversation(runner().model, { system: "Be kind." });
    await talk.say("one");
    await talk.say("two").system("Be brief.");
    const second = chat(last(turns(sink.displays)[1]));
    expect(second.messages).toEqual([
      { role: "system", content: "Be brief." },
      { role: "user", content: "two" },
      { role: "assistant", content: "answer 2" },
    ]);
    expect(second.earlier).toEqual([
      { role: "user", content: "one" },
      { role: "assistant", content: "answer 1" },
    ]);
  });

  it("starts again without earlier turns after clear()", async () => {
    const talk = new Conversation(runner().model);
    await talk.say("one");
    talk.clear();
    await talk.say("two");
    expect(chat(last(turns(sink.displays)[1])).earlier).toBeUndefined();
  });
});
