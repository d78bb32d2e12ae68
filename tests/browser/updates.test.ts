// In-place updates from a real kernel: an IPython kernel replays bundles through display_id /
// update_display_data, as the Qwen kernel does while a model talks or trains. The widget must be
// updated, not rebuilt, and end showing the final frame.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Browser, Locator, Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { codeNotebook, launchBrowser, newPage, openNotebook, pageErrors, snapshot, waitForIdleKernel, waitForOutput, writeNotebook } from "./browser";
import { RECORDED_STEPS, chatFrames, playFramesCell, trainFrames } from "./fixtures/notebook";

const lab = inject("lab");
let browser: Browser;
let page: Page;
let panel: Locator;

type Counters = { added: Record<string, number>; states: Record<string, string[]> };

beforeAll(async () => {
  writeFileSync(join(lab.root, "chat-frames.json"), JSON.stringify(chatFrames()));
  writeFileSync(join(lab.root, "train-frames.json"), JSON.stringify(trainFrames()));
  writeNotebook(
    lab,
    "updates.ipynb",
    codeNotebook(
      [
        ["chat", playFramesCell("chat-frames.json", 0.03)],
        ["train", playFramesCell("train-frames.json", 0.03)],
      ],
      { name: "python3", display_name: "Python 3", language: "python" },
    ),
  );
  browser = await launchBrowser();
  page = await newPage(browser);
  panel = await openNotebook(page, lab, "updates.ipynb");
  await waitForIdleKernel(panel);
  // Count how often each widget's root enters the page and which states it shows.
  await page.evaluate(() => {
    const c: Counters = { added: {}, states: {} };
    (window as unknown as { qwenbookCounters: Counters }).qwenbookCounters = c;
    const roots = [".qwenbook-chat", ".qwenbook-train"];
    const note = (el: Element) => {
      for (const sel of roots) {
        if (!el.matches(sel)) continue;
        const list = (c.states[sel] ??= []);
        const state = (el as HTMLElement).dataset.state ?? "";
        if (list[list.length - 1] !== state) list.push(state);
      }
    };
    new MutationObserver((mutations) => {
      for (const m of mutations) {
        if (m.type === "attributes") note(m.target as Element);
        for (const n of Array.from(m.addedNodes)) {
          if (!(n instanceof Element)) continue;
          for (const sel of roots) {
            const found = [...(n.matches(sel) ? [n] : []), ...Array.from(n.querySelectorAll(sel))];
            c.added[sel] = (c.added[sel] ?? 0) + found.length;
            found.forEach(note);
          }
        }
      }
    }).observe(document.body, { subtree: true, childList: true, attributes: true, attributeFilter: ["data-state"] });
  });
});

afterAll(async () => {
  await browser?.close();
});

async function counters(): Promise<Counters> {
  return page.evaluate(() => (window as unknown as { qwenbookCounters: Counters }).qwenbookCounters);
}

describe("updates through update_display_data", () => {
  it("stream a chat reply into one widget that ends done", async () => {
    const cell = panel.locator(".jp-Cell").nth(0);
    await cell.locator(".jp-InputArea-editor").click();
    await page.keyboard.press("Shift+Enter");
    await waitForOutput(page, cell, cell.locator(".qwenbook-chat[data-state='done']"), 60_000, "updates-chat");
    await expect(cell.locator(".qwenbook-chat").count()).resolves.toBe(1);
    await expect(cell.locator(".qwenbook-msg-assistant .qwenbook-msg-body").textContent()).resolves.toBe(
      "你好！我是通义千问，很高兴见到你。有什么可以帮你？",
    );
    await expect(cell.locator(".qwenbook-chat-tokens").textContent()).resolves.toBe("25 tokens");
    await expect(cell.locator(".qwenbook-caret").count()).resolves.toBe(0);
    const c = await counters();
    expect(c.added[".qwenbook-chat"]).toBe(1);
    expect(c.states[".qwenbook-chat"]).toEqual(["generating", "done"]);
    await snapshot(cell.locator(".jp-OutputArea-output"), "updates-chat");
  });

  it("grow the training chart in place to every recorded step", async () => {
    const cell = panel.locator(".jp-Cell").nth(1);
    await page.keyboard.press("Shift+Enter");
    await waitForOutput(page, cell, cell.locator(".qwenbook-train[data-state='done'] g.traceloss path.js-line"), 90_000, "updates-train");
    await expect(cell.locator(".js-plotly-plot").count()).resolves.toBe(1);
    // Plotly may still be drawing the last frame; wait until the line has every step.
    await expect
      .poll(async () => ((await cell.locator("g.traceloss path.js-line").getAttribute("d")) ?? "").split("L").length, { timeout: 10_000 })
      .toBe(RECORDED_STEPS);
    const c = await counters();
    expect(c.added[".qwenbook-train"]).toBe(1);
    expect(c.states[".qwenbook-train"]).toEqual(["running", "done"]);
    await snapshot(cell.locator(".jp-OutputArea-output"), "updates-train");
  });

  it("throw no page errors", () => {
    expect(pageErrors(page)).toEqual([]);
  });
});
