// Tools and thinking in the notebook API, without a worker: the builder checks and sends them, the reply
// exposes reasoning and calls (a malformed call as a readable error), a conversation carries calls and
// tool results forward and drops reasoning from its history.
import { describe, expect, it } from "vitest";
import type { ChatIO, ChatSettings, ChatTarget } from "./chat";
import { ChatRequest } from "./chat";
import { Conversation, type MessageRunner } from "./conversation";
import { toGenerateRequest } from "./generate-request";
import { Reply, ToolCallParseError } from "./reply";
import type { ChatMessage, ToolCall } from "./types";

const WEATHER = { name: "weather", description: "Weather in a city", parameters: { type: "object", properties: { city: { type: "string" } } } };
const CALL: ToolCall = { id: "call_1", name: "weather", arguments: { city: "Paris" } };

function reply(fields: Partial<ConstructorParameters<typeof Reply>[0]> = {}): Reply {
  return new Reply({
    text: "", finishReason: "stop", promptTokens: 1, completionTokens: 1, ttftMs: 1, durationMs: 1, tokensPerSecond: 1,
    tokenIds: [], model: "m", ...fields,
  });
}

const target = (run: ChatTarget["run"] = async () => reply()): ChatTarget => ({ label: "m", run });

describe("tools and thinking on a chat", () => {
  it("checks the tools at once and sends them with the thinking switch", () => {
    const req = new ChatRequest(target(), "Weather?").tools([WEATHER]).thinking(false);
    expect(req.settings).toMatchObject({ tools: [WEATHER], thinking: false });
    const wire = toGenerateRequest("m", [{ role: "user", content: "Weather?" }], req.settings);
    expect(wire.tools).toEqual([WEATHER]);
    expect(wire.thinking).toBe(false);
    expect(() => new ChatRequest(target(), "x").tools([{ name: "two words" }])).toThrow(/tools\(list\)\[0\]\.name must be 1-64/);
    expect(() => new ChatRequest(target(), "x").tools([WEATHER, WEATHER])).toThrow(/repeats the name "weather"/);
    expect(() => new ChatRequest(target(), "x").tools([{ name: "f", parameters: "object" } as never])).toThrow(/JSON Schema object/);
    expect(() => new ChatRequest(target(), "x").thinking("no" as never)).toThrow(/thinking\(on\)/);
  });

  it("sends tool messages and an assistant's calls in the wire's snake_case", () => {
    const messages: ChatMessage[] = [
      { role: "user", content: "Weather in Paris?" },
      { role: "assistant", content: "", toolCalls: [CALL] },
      { role: "tool", content: "sunny", toolCallId: "call_1", name: "weather" },
    ];
    expect(toGenerateRequest("m", messages, {}).messages).toEqual([
      { role: "user", content: "Weather in Paris?" },
      { role: "assistant", content: "", tool_calls: [CALL] },
      { role: "tool", content: "sunny", tool_call_id: "call_1", name: "weather" },
    ]);
    expect(() => toGenerateRequest("m", [{ role: "user", content: "x", toolCalls: [CALL] }], {})).toThrow(/only an assistant message/);
  });
});

describe("a reply's reasoning and tool calls", () => {
  it("gives the parsed calls, and a readable error for one the model wrote badly", () => {
    expect(reply({ toolCalls: [CALL], finishReason: "tool_calls" }).toolCalls).toEqual([CALL]);
    const bad = reply({ text: "<tool_call>{oops</tool_call>", toolCalls: [CALL], toolCallErrors: [{ text: "<tool_call>{oops</tool_call>", error: "tool call 2 is not valid JSON (Expecting property name)" }] });
    expect(() => bad.toolCalls).toThrow(ToolCallParseError);
    expect(() => bad.toolCalls).toThrow(/tool call 2 is not valid JSON.*It wrote: <tool_call>\{oops<\/tool_call>.*reply\.text/);
    expect(bad.readableToolCalls).toEqual([CALL]);
    expect(bad.toJSON()).toMatchObject({ toolCalls: [CALL], toolCallErrors: bad.toolCallErrors });
    const thought = reply({ text: "Hi!", reasoning: "They greet me." });
    expect(String(thought)).toBe("Hi!");
    expect(thought.toJSON()).toMatchObject({ text: "Hi!", reasoning: "They greet me." });
  });
});

describe("a conversation with tools", () => {
  it("keeps the calls with the answer, sends tool results back, and drops reasoning from the history", async () => {
    const sent: ChatMessage[][] = [];
    const answers = [
      reply({ text: "", reasoning: "I need the weather.", toolCalls: [CALL], finishReason: "tool_calls" }),
      reply({ text: "It is sunny in Paris.", reasoning: "The tool said sunny." }),
    ];
    const model: MessageRunner = {
      id: "m",
      async generate(messages: ChatMessage[], _s: Readonly<ChatSettings>, _io: ChatIO) {
        sent.push(messages.map((m) => ({ ...m })));
        return answers[sent.length - 1];
      },
    };
    const talk = new Conversation(model);
    const first = await talk.say("Weather in Paris?").tools([WEATHER]).quiet();
    for (const call of first.toolCalls) {
      await talk.say({ role: "tool", content: { sky: "sunny" }, toolCallId: call.id, name: call.name }).tools([WEATHER]).quiet();
    }
    expect(sent[1]).toEqual([
      { role: "user", content: "Weather in Paris?" },
      { role: "assistant", content: "", toolCalls: [CALL] },
      { role: "tool", content: '{"sky":"sunny"}', toolCallId: "call_1", name: "weather" },
    ]);
    expect(talk.history.at(-1)).toEqual({ role: "assistant", content: "It is sunny in Paris." });
    expect(String(talk)).toBe("Conversation(m, 2 turns)");
    expect(() => talk.say({ role: "user", content: "x" } as never)).toThrow(/must be a string or \{ role: "tool", content \}/);
    expect(() => talk.say([])).toThrow(/got no tool results/);
  });
});
