// A conversation on the live tiny model: each talk.say() cell shows its own turn, and the earlier
// turns sit behind a collapsed "N earlier turns" marker instead of being drawn again in every cell.
import type { Browser, Locator, Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { codeNotebook, launchBrowser, newPage, openNotebook, outputWith, pageErrors, snapshot, waitForIdleKernel, waitForOutput, writeNotebook } from "./browser";

const lab = inject("lab");
const PROMPTS = ["My name is Lin.", "What is two plus two?", "What is my name?"];
let browser: Browser;
let page: Page;
let panel: Locator;

function conversationNotebook(): object {
  return codeNotebook([
    ["load", 'import { qwen } from "qwenbook";\nconst m = await qwen.load(process.env.QWENBOOK_TINY_MODEL!);\nconst talk = m.conversation();'],
    ...PROMPTS.map((p, i): [string, string] => [`say${i + 1}`, `await talk.say(${JSON.stringify(p)}).greedy().maxTokens(8);`]),
  ]);
}

/** Runs cell `index` and waits until its output holds a finished chat widget. */
async function runChatCell(index: number, name: string): Promise<Locator> {
  const cell = panel.locator(".jp-Cell").nth(index);
  await cell.locator(".jp-InputArea-editor").click();
  await page.keyboard.press("Shift+Enter");
  const out = cell.locator(".jp-OutputArea-output:has(.qwenbook-chat[data-state='done'])");
  await waitForOutput(page, cell, out, 180_000, name);
  return out;
}

beforeAll(async () => {
  writeNotebook(lab, "conversation.ipynb", conversationNotebook());
  browser = await launchBrowser();
  page = await newPage(browser);
  panel = await openNotebook(page, lab, "conversation.ipynb");
  await waitForIdleKernel(panel);
});

afterAll(async () => {
  await browser?.close();
});

describe("a conversation in a live notebook", () => {
  it("shows only the new turn in each say() cell, the earlier ones behind a collapsed marker", async () => {
    const load = panel.locator(".jp-Cell").first();
    await load.locator(".jp-InputArea-editor").click();
    await page.keyboard.press("Shift+Enter");
    await page.waitForFunction(
      () => /\[\d+\]/.test(document.querySelector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell .jp-InputPrompt")?.textContent ?? ""),
      undefined,
      { timeout: 180_000, polling: 250 },
    );
    const loadErrors = await load.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").allInnerTexts();
    expect(loadErrors).toEqual([]);

    const first = await runChatCell(1, "conversation-turn1");
    await expect(first.locator(".qwenbook-chat-earlier:visible").count()).resolves.toBe(0);
    await runChatCell(2, "conversation-turn2");
    const third = await runChatCell(3, "conversation-turn3");
    await snapshot(third, "conversation-turn3");

    // Collapsed: the new question and its reply, nothing of the first two exchanges.
    const visibleUsers = third.locator(".qwenbook-msg-user:visible .qwenbook-msg-body");
    await expect(visibleUsers.allTextContents()).resolves.toEqual([PROMPTS[2]]);
    await expect(third.locator(".qwenbook-msg-assistant:visible").count()).resolves.toBe(1);
    const marker = third.locator(".qwenbook-chat-earlier > summary");
    await expect(marker.textContent()).resolves.toBe("2 earlier turns");
    const firstQuestion = third.locator(".qwenbook-msg-user:visible .qwenbook-msg-body", { hasText: PROMPTS[0] });
    await expect(firstQuestion.count()).resolves.toBe(0);

    // Expanded in place (by keyboard, as a reader without a mouse would): the first exchange appears once.
    await marker.focus();
    await page.keyboard.press("Enter");
    await third.locator(".qwenbook-chat-earlier[open]").waitFor();
    await expect(firstQuestion.count()).resolves.toBe(1);
    await expect(visibleUsers.allTextContents()).resolves.toEqual(PROMPTS);
    await expect(third.locator(".qwenbook-msg-assistant:visible").count()).resolves.toBe(3);
    await snapshot(third, "conversation-turn3-expanded");

    // The other cells were not touched: the second still shows its own turn under "1 earlier turn".
    const second = outputWith(panel.locator(".jp-Cell").nth(2), ".qwenbook-chat");
    await expect(second.locator(".qwenbook-chat-earlier > summary").textContent()).resolves.toBe("1 earlier turn");
  });

  it("throws no page errors", () => {
    expect(pageErrors(page)).toEqual([]);
  });
});
