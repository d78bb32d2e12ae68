// Tool calls through the OpenAI-compatible server with the npm `openai` client: the tiny Qwen2 trained to
// call a calculator (python-bridge/tests/tool_model.py) is served headless by `python -m
// qwenbook_bridge.openai.cli`; a greedy request comes back as tool_calls (whole, and streamed through the
// client's stream helper), and the tool's result sent back gets the final answer. One transcript of each
// is printed for the record.
import { spawn, type ChildProcess } from "node:child_process";
import OpenAI from "openai";
import type { ChatCompletionCreateParamsNonStreaming, ChatCompletionMessageParam, ChatCompletionTool } from "openai/resources/chat/completions";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { python, toolModel } from "./helpers";

const NAME = "calc";
const QUESTION = "What is 17 times 23?";
const CALCULATOR: ChatCompletionTool = {
  type: "function",
  function: {
    name: "calculator",
    description: "Evaluate an arithmetic expression",
    parameters: { type: "object", properties: { expression: { type: "string" } }, required: ["expression"] },
  },
};

let child: ChildProcess;
let openai: OpenAI;

function request(messages: ChatCompletionMessageParam[]): ChatCompletionCreateParamsNonStreaming {
  return { model: NAME, messages, tools: [CALCULATOR], temperature: 0, max_tokens: 40 };
}

beforeAll(async () => {
  const folder = await toolModel();
  child = spawn(python, ["-m", "qwenbook_bridge.openai.cli", folder, "--port", "0", "--name", NAME, "--device", "cpu", "--dtype", "fp32"], {
    env: { ...process.env, OMP_NUM_THREADS: "1" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  let err = "";
  child.stderr!.on("data", (d: Buffer) => (err += d));
  const url = await new Promise<string>((resolve, reject) => {
    child.stdout!.on("data", (d: Buffer) => {
      out += d;
      const m = new RegExp(`Serving ${NAME} at (http://\\S+/v1)`).exec(out);
      if (m) resolve(m[1]);
    });
    child.once("exit", (code) => reject(new Error(`the server exited (${code}) before serving:\n${out}\n${err}`)));
  });
  openai = new OpenAI({ baseURL: url, apiKey: "unused", maxRetries: 0, timeout: 120_000 });
});

afterAll(async () => {
  if (child && child.exitCode === null) {
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill("SIGTERM");
    await exited;
  }
});

describe("tool calls through the server, npm openai client", () => {
  it("answers a question with the calculator call, then the tool's result with the answer", async () => {
    const asked = request([{ role: "user", content: QUESTION }]);
    const reply = await openai.chat.completions.create(asked);
    console.log(`transcript (npm openai, whole)\nrequest: ${JSON.stringify(asked)}\nresponse: ${JSON.stringify(reply)}`);
    const choice = reply.choices[0];
    expect(choice.finish_reason).toBe("tool_calls");
    expect(choice.message.content).toBeNull();
    const call = choice.message.tool_calls![0];
    expect(choice.message.tool_calls).toHaveLength(1);
    if (call.type !== "function") throw new Error(`expected a function call, got ${call.type}`);
    expect(call.id).toMatch(/^call_/);
    expect(call.function.name).toBe("calculator");
    expect(JSON.parse(call.function.arguments)).toEqual({ expression: "17*23" });

    const followUp = request([
      { role: "user", content: QUESTION },
      choice.message,
      { role: "tool", tool_call_id: call.id, content: "391" },
    ]);
    const answer = await openai.chat.completions.create(followUp);
    expect(answer.choices[0].message.content).toBe("391.");
    expect(answer.choices[0].finish_reason).toBe("stop");
  });

  it("streams the call so that the client's stream helper accumulates it", async () => {
    const asked = { ...request([{ role: "user", content: QUESTION }]), stream: true as const };
    const runner = openai.chat.completions.stream(asked);
    const chunks: unknown[] = [];
    runner.on("chunk", (chunk) => chunks.push(chunk));
    const final = await runner.finalChatCompletion();
    console.log(`transcript (npm openai, streamed)\nrequest: ${JSON.stringify(asked)}\nchunks:\n${chunks.map((c) => JSON.stringify(c)).join("\n")}`);
    const choice = final.choices[0];
    expect(choice.finish_reason).toBe("tool_calls");
    const call = choice.message.tool_calls![0];
    if (call.type !== "function") throw new Error(`expected a function call, got ${call.type}`);
    expect(call.function.name).toBe("calculator");
    expect(JSON.parse(call.function.arguments)).toEqual({ expression: "17*23" });
    expect(choice.message.content ?? "").toBe("");
  });
});
