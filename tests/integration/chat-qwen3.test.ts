// Qwen3 chat through a real worker and the notebook API: the thinking switch and the tools reach the
// model's own template (prompt lengths equal transformers' apply_chat_template with the same arguments),
// and the reply comes back with its reasoning apart.
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Qwen, type Model } from "../../kernel/src/index";
import { privateRuntimeDir, recordingSink, runCli, runPythonJson } from "./helpers";

const WEATHER = {
  name: "weather",
  description: "Weather in a city",
  parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
};
const ASK = [{ role: "user" as const, content: "What is the weather in Paris?" }];

let qwen: Qwen;
let model: Model;
let folder: string;

beforeAll(async () => {
  privateRuntimeDir("chat-qwen3");
  folder = join(mkdtempSync(join(tmpdir(), "qwenbook-qwen3-")), "tiny-qwen3");
  // As a user would make one to try Qwen3 without a GPU.
  const made = runCli("tiny-model", folder, "--arch", "qwen3");
  if (made.status !== 0) throw new Error(`tiny-model --arch qwen3 failed: ${made.stderr}`);
  qwen = new Qwen({ sink: recordingSink() });
  model = await qwen.load(folder, { dtype: "fp32", device: "cpu" });
}, 180_000);

afterAll(async () => {
  await qwen?.shutdown();
});

/** Prompt lengths transformers' own apply_chat_template gives for the same messages, tools and switch. */
function templateLengths(): Promise<Record<string, number>> {
  const script = [
    "import json, sys",
    "from transformers import AutoTokenizer",
    "tok = AutoTokenizer.from_pretrained(sys.argv[1])",
    "ask, tool = json.loads(sys.argv[2]), {'type': 'function', 'function': json.loads(sys.argv[3])}",
    "text = lambda **kw: tok.apply_chat_template(ask, add_generation_prompt=True, tokenize=False, **kw)",
    "n = lambda **kw: len(tok(text(**kw), add_special_tokens=False)['input_ids'])",
    "print(json.dumps({'default': n(), 'on': n(enable_thinking=True), 'off': n(enable_thinking=False),",
    "                  'tools_off': n(tools=[tool], enable_thinking=False)}))",
  ].join("\n");
  return runPythonJson(["-c", script, folder, JSON.stringify(ASK), JSON.stringify(WEATHER)]);
}

describe("Qwen3 through the notebook API", () => {
  it("sends the thinking switch and the tools to the template", async () => {
    const expected = await templateLengths();
    const ask = () => model.chat(ASK[0].content).greedy().maxTokens(4).quiet();
    const plain = await ask();
    const on = await ask().thinking(true);
    const off = await ask().thinking(false);
    const tools = await ask().thinking(false).tools([WEATHER]);
    console.log(`prompt tokens: default ${plain.promptTokens}, thinking on ${on.promptTokens}, off ${off.promptTokens}, off with a tool ${tools.promptTokens}; transformers: ${JSON.stringify(expected)}`);
    expect(plain.promptTokens).toBe(expected.default);
    expect(on.promptTokens).toBe(expected.on);
    expect(off.promptTokens).toBe(expected.off);
    expect(tools.promptTokens).toBe(expected.tools_off);
    // Off writes an empty <think></think> block into the prompt: the reply is all answer.
    expect(off.promptTokens).toBeGreaterThan(on.promptTokens);
    expect(off.reasoning).toBe("");
    expect(tools.promptTokens).toBeGreaterThan(off.promptTokens + 20);
  }, 120_000);

  it("refuses a badly named tool at once, naming the field", () => {
    expect(() => model.chat("hi").tools([{ name: "bad name" }])).toThrow(/tools\(list\)\[0\]\.name must be 1-64/);
  });
});
