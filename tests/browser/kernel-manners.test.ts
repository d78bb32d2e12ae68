// The kernel's manners in a live notebook: the status bar reads Busy for the whole of a Run All,
// errors print one readable line, an interrupted chat leaves its "cancelled" widget as the only
// message (no red error under it), and an awaited chat is not echoed as `Reply(...)` text.
import { existsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Browser, Locator, Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { codeNotebook, launchBrowser, newPage, openNotebook, outputWith, pageErrors, snapshot, waitForIdleKernel, waitForOutput, writeNotebook } from "./browser";

const lab = inject("lab");
const STDERR = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']";
const STDOUT = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stdout']";
let browser: Browser;
let page: Page;

/** Waits until the status bar reads "<kernel> | <state>". */
async function waitForStatus(state: string, timeout = 30_000): Promise<void> {
  await page.waitForFunction(
    (want) =>
      Array.from(document.querySelectorAll("#jp-main-statusbar .jp-StatusBar-TextItem")).some((el) =>
        (el.textContent ?? "").trim().endsWith(` | ${want}`),
      ),
    state,
    { timeout, polling: 100 },
  );
}

/** Waits until cell `cell` shows an execution count (it has finished). */
async function waitForCount(cell: Locator, timeout = 180_000): Promise<void> {
  await cell.locator(".jp-InputPrompt").filter({ hasText: /\[\d+\]/ }).waitFor({ timeout });
}

async function runCell(panel: Locator, index: number): Promise<Locator> {
  const cell = panel.locator(".jp-Cell").nth(index);
  await cell.locator(".jp-InputArea-editor").click();
  await page.keyboard.press("Shift+Enter");
  return cell;
}

beforeAll(async () => {
  browser = await launchBrowser();
  page = await newPage(browser);
});

afterAll(async () => {
  await browser?.close();
});

describe("the kernel's manners in a live notebook", () => {
  it("reads Busy in the status bar for the whole of a Run All, not Idle after the first cell", async () => {
    // Each of the first two cells runs until the test creates its file, so the checks happen while
    // the Run All is in progress; the third waits behind them.
    const release = (n: number) => join(lab.root, `run-all.release${n}`);
    const hold = (n: number) =>
      'import { existsSync } from "node:fs";\n' +
      `while (!existsSync(${JSON.stringify(release(n))})) await new Promise((r) => setTimeout(r, 100));`;
    writeNotebook(lab, "run-all.ipynb", codeNotebook([["first", hold(1)], ["second", hold(2)], ["third", '"done"']]));
    const panel = await openNotebook(page, lab, "run-all.ipynb");
    await waitForIdleKernel(panel);
    await page.locator(".lm-MenuBar-itemLabel", { hasText: /^Run$/ }).click();
    await page.locator(".lm-Menu-itemLabel", { hasText: /^Run All Cells$/ }).click();
    const cells = panel.locator(".jp-Cell");
    for (let i = 0; i < 3; i++) await cells.nth(i).locator(".jp-InputPrompt").filter({ hasText: "[*]" }).waitFor();
    await waitForStatus("Busy");
    writeFileSync(release(1), "");
    await waitForCount(cells.nth(0));
    // The first cell's idle may come a moment before the second's busy; the bar must read Busy
    // while the second cell runs (tslab alone said Idle from here to the end of the run).
    await waitForStatus("Busy");
    await expect(cells.nth(1).locator(".jp-InputPrompt").textContent()).resolves.toContain("[*]");
    await snapshot(page.locator("#jp-main-statusbar"), "manners-run-all-statusbar");
    writeFileSync(release(2), "");
    await waitForCount(cells.nth(2));
    await waitForIdleKernel(panel);
    expect(existsSync(release(2))).toBe(true);
  });

  describe("a chat notebook", () => {
    let panel: Locator;

    beforeAll(async () => {
      writeNotebook(
        lab,
        "manners.ipynb",
        codeNotebook([
          ["load", 'import { qwen } from "qwenbook";\nconst m = await qwen.load(process.env.QWENBOOK_TINY_MODEL!, { quiet: true });'],
          ["chat", 'await m.chat("你好").maxTokens(8);'],
          ["lora", "m.lora({ r: 0 });"],
          ["worker", 'await qwen.load("qwenbook-tests/no-such-model-anywhere", { quiet: true });'],
          ["long", 'await m.chat("Tell me a very long story.").greedy().maxTokens(3000);'],
          ["unload", "await m.unload();"],
          ["gone", 'await m.chat("hi").maxTokens(2);'],
        ]),
      );
      panel = await openNotebook(page, lab, "manners.ipynb");
      await waitForIdleKernel(panel);
      const load = await runCell(panel, 0);
      await waitForCount(load);
      await expect(load.locator(STDERR).count()).resolves.toBe(0);
    });

    it("shows an awaited chat in its widget only, with no Reply(...) text under it", async () => {
      const cell = await runCell(panel, 1);
      const out = outputWith(cell, ".qwenbook-chat[data-state='done']");
      await waitForOutput(page, cell, out, 180_000, "manners-chat");
      await waitForCount(cell);
      await snapshot(cell.locator(".jp-OutputArea"), "manners-chat");
      const texts = await cell.locator(".jp-OutputArea-output").allInnerTexts();
      expect(texts.filter((t) => t.includes("Reply("))).toEqual([]);
      await expect(cell.locator(STDOUT).count()).resolves.toBe(0);
    });

    it("prints a bad argument as one line: its name and message, no stack or source snippet", async () => {
      const cell = await runCell(panel, 2);
      await waitForCount(cell);
      const err = cell.locator(STDERR);
      await err.first().waitFor();
      await snapshot(cell.locator(".jp-OutputArea"), "manners-error-lora");
      const text = (await err.allInnerTexts()).join("\n").trim();
      expect(text).toMatch(/^RangeError: .*\br\b/);
      expect(text.split("\n")).toHaveLength(1);
    });

    it("prints a worker error as one line with the Python exception, not the whole error object", async () => {
      const cell = await runCell(panel, 3);
      await waitForCount(cell);
      const err = cell.locator(STDERR);
      await err.first().waitFor();
      await snapshot(cell.locator(".jp-OutputArea"), "manners-error-worker");
      const text = (await err.allInnerTexts()).join("\n").trim();
      expect(text).toContain("qwenbook-tests/no-such-model-anywhere");
      expect(text).not.toContain("traceback:");
      expect(text.split("\n").length).toBeLessThanOrEqual(2);
    });

    it("ends an interrupted chat with its cancelled widget and no red error text", async () => {
      const cell = await runCell(panel, 4);
      // Interrupt once tokens are flowing, as a reader would.
      await cell.locator(".qwenbook-chat[data-state='generating'] .qwenbook-msg-assistant .qwenbook-msg-body").filter({ hasText: /\S/ }).waitFor({ timeout: 180_000 });
      await panel.locator("[data-command='notebook:interrupt-kernel']").first().click();
      const out = outputWith(cell, ".qwenbook-chat[data-state='cancelled']");
      await waitForOutput(page, cell, out, 120_000, "manners-interrupt");
      await waitForCount(cell);
      await waitForIdleKernel(panel);
      await snapshot(cell.locator(".jp-OutputArea"), "manners-interrupt");
      await expect(cell.locator(STDERR).count()).resolves.toBe(0);
      const texts = (await cell.locator(".jp-OutputArea-output").allInnerTexts()).join("\n");
      expect(texts).not.toContain("Interrupted asynchronously");
    });

    it("shows a chat's error in its bubble only, not again as text under it", async () => {
      await waitForCount(await runCell(panel, 5));
      const cell = await runCell(panel, 6);
      const out = outputWith(cell, ".qwenbook-chat[data-state='error']");
      await waitForOutput(page, cell, out, 60_000, "manners-error-bubble");
      await waitForCount(cell);
      await snapshot(cell.locator(".jp-OutputArea"), "manners-error-bubble");
      await expect(cell.locator(STDERR).count()).resolves.toBe(0);
      await expect(out.textContent()).resolves.toContain("was unloaded in this notebook (m.unload())");
    });
  });

  it("throws no page errors", () => {
    expect(pageErrors(page)).toEqual([]);
  });
});
