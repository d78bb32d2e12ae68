// Scenario 2: the real thing. A notebook on the "Qwen (TypeScript)" kernel loads the tiny model
// through the worker, streams a chat reply into the chat widget and shows the memory gauge.
import type { Browser, Locator, Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { codeNotebook, launchBrowser, newPage, openNotebook, outputWith, pageErrors, QWEN_KERNEL, snapshot, waitForIdleKernel, waitForOutput, writeNotebook } from "./browser";

const lab = inject("lab");
const KERNEL = QWEN_KERNEL.name;
let browser: Browser;
let page: Page;
let panel: Locator;

function liveNotebook(): object {
  return codeNotebook([
    ["chat", 'import { qwen } from "qwenbook";\nconst m = await qwen.load(process.env.QWENBOOK_TINY_MODEL!);\nawait m.chat("你好").maxTokens(16);'],
    ["gpu", "qwen.gpu();"],
  ]);
}

beforeAll(async () => {
  const r = await fetch(`${lab.url}/api/kernelspecs`, { headers: { Authorization: `token ${lab.token}` } });
  const specs = (await r.json()) as { kernelspecs: Record<string, unknown> };
  if (!(KERNEL in specs.kernelspecs)) {
    throw new Error(
      `The ${KERNEL} kernelspec is not installed in the venv (found: ${Object.keys(specs.kernelspecs).join(", ")}); ` +
        "run the setup (npm test runs it) so JupyterLab can start the Qwen (TypeScript) kernel.",
    );
  }
  writeNotebook(lab, "live.ipynb", liveNotebook());
  browser = await launchBrowser();
  page = await newPage(browser);
  panel = await openNotebook(page, lab, "live.ipynb");
  await waitForIdleKernel(panel);
  // Record every state the chat widget passes through, to tell a streamed reply from one drawn once.
  await page.evaluate(() => {
    const seen: string[] = [];
    (window as unknown as { qwenbookChatStates: string[] }).qwenbookChatStates = seen;
    const record = (el: Element) => {
      const state = (el as HTMLElement).dataset.state;
      if (state && seen[seen.length - 1] !== state) seen.push(state);
    };
    new MutationObserver((mutations) => {
      for (const m of mutations) {
        if (m.type === "attributes" && (m.target as Element).classList.contains("qwenbook-chat")) record(m.target as Element);
        for (const n of Array.from(m.addedNodes)) {
          if (n instanceof Element) n.querySelectorAll(".qwenbook-chat").forEach(record);
        }
      }
    }).observe(document.body, { subtree: true, childList: true, attributes: true, attributeFilter: ["data-state"] });
  });
});

afterAll(async () => {
  await browser?.close();
});

describe("a live Qwen (TypeScript) kernel", () => {
  it("streams a chat reply into the chat widget with its token count", async () => {
    const cell = panel.locator(".jp-Cell").first();
    await cell.locator(".jp-InputArea-editor").click();
    await page.keyboard.press("Shift+Enter");
    const out = outputWith(panel, ".qwenbook-chat[data-state='done']");
    await waitForOutput(page, cell, out, 180_000, "live-chat");
    await expect(out.locator(".qwenbook-msg-user .qwenbook-msg-body").textContent()).resolves.toBe("你好");
    const reply = (await out.locator(".qwenbook-msg-assistant .qwenbook-msg-body").textContent()) ?? "";
    expect(reply.trim().length).toBeGreaterThan(0);
    const tokens = (await out.locator(".qwenbook-chat-tokens").textContent()) ?? "";
    const n = Number(/^(\d+) tokens?$/.exec(tokens)?.[1]);
    expect(n).toBeGreaterThanOrEqual(1);
    expect(n).toBeLessThanOrEqual(16);
    await expect(out.locator(".qwenbook-chat-rate").textContent()).resolves.toMatch(/^[\d.,]+ tokens\/s$/);
    const states = await page.evaluate(() => (window as unknown as { qwenbookChatStates: string[] }).qwenbookChatStates);
    expect(states.indexOf("generating")).toBeGreaterThanOrEqual(0);
    expect(states.indexOf("generating")).toBeLessThan(states.lastIndexOf("done"));
    // The widget is the reply's only rendering: tslab must not print the text again under it.
    const plainOutputs = await panel.locator(".jp-Cell").first().locator(".jp-OutputArea-output pre").allTextContents();
    expect(plainOutputs.filter((t) => t.includes(reply.trim()))).toEqual([]);
    await snapshot(out, "live-chat");
  });

  it("shows the memory gauge with numbers", async () => {
    await page.keyboard.press("Shift+Enter");
    const out = outputWith(panel, ".qwenbook-gauge");
    await waitForOutput(page, panel.locator(".jp-Cell").nth(1), out, 60_000, "live-gpu");
    await expect(out.locator(".qwenbook-dial-label").first().textContent()).resolves.toMatch(/^\d+%$/);
    await expect(out.locator(".qwenbook-stat-used .qwenbook-stat-value").first().textContent()).resolves.toMatch(/^\d+(\.\d)? (GiB|MiB)$/);
    await snapshot(out, "live-gpu");
  });

  it("throws no page errors", () => {
    expect(pageErrors(page)).toEqual([]);
  });
});
