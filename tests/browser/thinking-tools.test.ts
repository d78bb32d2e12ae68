// A live chat whose reply thinks and calls a tool: the chat widget shows the reasoning in a folded Thinking
// block with its time and token count, and the call as a card (tool name, arguments as JSON), not raw tags.
// The model is the tiny Qwen3 fine-tuned in beforeAll to give exactly such a reply (python-bridge/tests/tool_model.py --spec).
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Browser, Locator, Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { codeNotebook, launchBrowser, newPage, openNotebook, pageErrors, snapshot, waitForIdleKernel, waitForOutput, writeNotebook } from "./browser";
import { REPO } from "./lab";

const lab = inject("lab");
const QUESTION = "What is the weather in Paris?";
const WEATHER = {
  name: "weather",
  description: "Current weather in a city",
  parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
};
const THOUGHT = "The user wants the weather in Paris. I should call the weather tool.";
const ANSWER = "Let me check the weather.";
const REPLY = `<think>\n${THOUGHT}\n</think>\n\n${ANSWER}\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>`;

let work: string;
let browser: Browser;
let page: Page;
let panel: Locator;

/**
 * Fine-tunes a copy of the tiny Qwen3 until greedy decoding answers QUESTION with REPLY; resolves to its folder.
 * Run without blocking: vitest's worker must keep answering its runner meanwhile.
 */
function trainToolModel(): Promise<string> {
  const source = join(REPO, ".qwenbook", "models", "tiny-qwen3");
  const out = join(work, "tiny-qwen3-tools");
  const spec = join(work, "spec.json");
  writeFileSync(spec, JSON.stringify({ messages: [{ role: "user", content: QUESTION }], tools: [WEATHER], reply: REPLY }));
  const python = process.env.QWENBOOK_PYTHON ?? join(REPO, ".venv", "bin", "python");
  const proc = spawn(python, [join(REPO, "python-bridge", "tests", "tool_model.py"), "--spec", spec, source, out], {
    cwd: REPO,
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  proc.stderr.on("data", (chunk: Buffer) => {
    stderr = (stderr + chunk.toString()).slice(-5000);
  });
  return new Promise((resolve, reject) => {
    proc.once("error", reject);
    proc.once("close", (code, signal) => {
      if (code === 0) resolve(out);
      else reject(new Error(`tool_model.py failed (exit ${code ?? signal}); is ${source} built (npm test's setup builds it)?\n${stderr}`));
    });
  });
}

beforeAll(async () => {
  work = mkdtempSync(join(tmpdir(), "qwenbook-tool-model-"));
  const model = await trainToolModel();
  writeNotebook(
    lab,
    "thinking-tools.ipynb",
    codeNotebook([
      ["load", `import { qwen } from "qwenbook";\nconst m = await qwen.load(${JSON.stringify(model)});`],
      [
        "chat",
        `const talk = m.conversation();\nconst r = await talk.say(${JSON.stringify(QUESTION)}).tools([${JSON.stringify(WEATHER)}]).thinking(true).greedy().maxTokens(96);`,
      ],
      [
        "result",
        `await talk.say({ role: "tool", content: { sky: "sunny", c: 21 }, toolCallId: r.toolCalls[0].id, name: "weather" }).tools([${JSON.stringify(WEATHER)}]).greedy().maxTokens(8);`,
      ],
    ]),
  );
  browser = await launchBrowser();
  page = await newPage(browser);
  panel = await openNotebook(page, lab, "thinking-tools.ipynb");
  await waitForIdleKernel(panel);
});

afterAll(async () => {
  await browser?.close();
  if (work) rmSync(work, { recursive: true, force: true });
});

describe("a reply that thinks and calls a tool, in a live notebook", () => {
  it("folds the reasoning into a Thinking block and draws the call as a card", async () => {
    const load = panel.locator(".jp-Cell").first();
    await load.locator(".jp-InputArea-editor").click();
    await page.keyboard.press("Shift+Enter");
    const cell = panel.locator(".jp-Cell").nth(1);
    await cell.locator(".jp-InputArea-editor").click();
    await page.keyboard.press("Shift+Enter");
    const out = cell.locator(".jp-OutputArea-output:has(.qwenbook-chat[data-state='done'])");
    await waitForOutput(page, cell, out, 180_000, "thinking-tools");

    const assistant = out.locator(".qwenbook-msg-assistant .qwenbook-msg-body");
    const think = assistant.locator("details.qwenbook-think");
    await expect(think.evaluate((d) => (d as HTMLDetailsElement).open)).resolves.toBe(false);
    await expect(think.locator("summary").textContent()).resolves.toMatch(/^Thought for [\d.]+ (ms|s) · \d+ tokens$/);
    await expect(think.locator(".qwenbook-think-body").textContent()).resolves.toBe(THOUGHT);
    await expect(assistant.locator(":scope > p").textContent()).resolves.toBe(ANSWER);
    await expect(out.locator(".qwenbook-chat-footer").textContent()).resolves.toContain("tokens");

    const card = assistant.locator(".qwenbook-tool-call");
    await expect(card.count()).resolves.toBe(1);
    await expect(card.locator(".qwenbook-tool-call-name").textContent()).resolves.toBe("weather");
    await expect(card.locator(".qwenbook-tool-call-args").textContent()).resolves.toBe('{\n  "city": "Paris"\n}');
    await expect(out.textContent()).resolves.not.toContain("<tool_call>");
    await expect(out.textContent()).resolves.not.toContain("<think>");

    const shots = [await snapshot(think, "thinking-block-folded")];
    // Opened from the keyboard, as a reader without a mouse would.
    await think.locator("summary").focus();
    await page.keyboard.press("Enter");
    await assistant.locator("details.qwenbook-think[open]").waitFor();
    await think.locator("summary").blur();
    shots.push(await snapshot(out, "thinking-tools-chat"), await snapshot(think, "thinking-block"), await snapshot(card, "tool-call-card"));
    console.log(`screenshots:\n${shots.join("\n")}`);
  });

  it("draws the tool's result given back to the conversation under the tool's name", async () => {
    const cell = panel.locator(".jp-Cell").nth(2);
    await cell.locator(".jp-InputArea-editor").click();
    await page.keyboard.press("Shift+Enter");
    const out = cell.locator(".jp-OutputArea-output:has(.qwenbook-chat[data-state='done'])");
    await waitForOutput(page, cell, out, 180_000, "tool-result");
    const result = out.locator(".qwenbook-chat > .qwenbook-chat-messages .qwenbook-msg-tool");
    await expect(result.locator(".qwenbook-msg-role").textContent()).resolves.toBe("Tool result · weather");
    await expect(result.locator(".qwenbook-tool-result").textContent()).resolves.toBe('{\n  "sky": "sunny",\n  "c": 21\n}');
    // The call it answers is in the folded earlier turn, as a card there too.
    await expect(out.locator(".qwenbook-chat-earlier > summary").textContent()).resolves.toBe("1 earlier turn");
    await expect(out.locator(".qwenbook-chat-earlier .qwenbook-tool-call-name").textContent()).resolves.toBe("weather");
    console.log(`screenshot:\n${await snapshot(out, "tool-result")}`);
  });

  it("throws no page errors", () => {
    expect(pageErrors(page)).toEqual([]);
  });
});
