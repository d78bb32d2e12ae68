// Scenario 1, no kernel involved: a notebook whose saved outputs hold recorded bundles opens in
// JupyterLab and the extension draws them.
import type { Browser, Locator, Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { launchBrowser, newPage, openNotebook, outputWith, pageErrors, setTheme, snapshot, writeNotebook } from "./browser";
import { CHAT_TOKENS, PREFERENCE_STEPS, RECORDED_EVALS, RECORDED_STEPS, widgetsNotebook } from "./fixtures/notebook";

const lab = inject("lab");
let browser: Browser;
let page: Page;
let panel: Locator;

/** Vertices of an SVG path made of M/L commands, as Plotly draws an unsimplified line. */
function vertices(d: string | null): number {
  return (d ?? "").split(/[ML]/).filter((s) => s.trim() !== "").length;
}

beforeAll(async () => {
  writeNotebook(lab, "widgets.ipynb", widgetsNotebook());
  browser = await launchBrowser();
  page = await newPage(browser);
  panel = await openNotebook(page, lab, "widgets.ipynb");
});

afterAll(async () => {
  await browser?.close();
});

describe("saved Qwenbook outputs in JupyterLab", () => {
  it("draws the chat transcript with its reply and token count", async () => {
    const out = outputWith(panel, ".qwenbook-chat[data-state='done']");
    await out.waitFor({ timeout: 30_000 });
    const assistant = out.locator(".qwenbook-msg-assistant .qwenbook-msg-body");
    await expect(assistant.textContent()).resolves.toContain("迭代");
    await expect(assistant.locator(".qwenbook-code pre code").textContent()).resolves.toContain("def fib(n: int) -> int:");
    await expect(out.locator(".qwenbook-msg-user .qwenbook-msg-body").textContent()).resolves.toBe(
      "用 Python 写一个函数，计算斐波那契数列的第 n 项。",
    );
    await expect(out.locator(".qwenbook-chat-tokens").textContent()).resolves.toBe(`${CHAT_TOKENS} tokens`);
    await expect(out.locator(".qwenbook-chat-rate").textContent()).resolves.toBe("44.9 tokens/s");
    await snapshot(out, "chat");
  });

  it("shows a reply still being generated with a caret", async () => {
    const out = outputWith(panel, ".qwenbook-chat[data-state='generating']");
    await out.waitFor();
    await expect(out.locator(".qwenbook-caret").count()).resolves.toBe(1);
    await expect(out.locator(".qwenbook-badge-live").textContent()).resolves.toBe("generating…");
    await snapshot(out, "chat-generating");
  });

  it("draws the training loss with one vertex per recorded step", async () => {
    const out = outputWith(panel, ".qwenbook-train[data-state='done']");
    await out.scrollIntoViewIfNeeded();
    const line = out.locator("g.traceloss path.js-line");
    await line.waitFor({ timeout: 60_000 });
    expect(vertices(await line.getAttribute("d"))).toBe(RECORDED_STEPS);
    expect(vertices(await out.locator("g.traceloss-smoothed path.js-line").getAttribute("d"))).toBe(RECORDED_STEPS);
    await expect(out.locator("g.traceeval-loss path.point").count()).resolves.toBe(RECORDED_EVALS);
    await expect(out.locator("g.tracelr path.js-line").count()).resolves.toBe(1);
    await expect(out.locator(".qwenbook-train-note-ok").textContent()).resolves.toMatch(/^Finished 50 steps in /);
    await expect(out.locator(".qwenbook-progress-text").textContent()).resolves.toContain("step 50 / 50 (100%)");
    // The chart fills the output's width rather than Plotly's 700 px default.
    const plotBox = await out.locator(".qwenbook-train-plot .main-svg").first().boundingBox();
    const outBox = await out.boundingBox();
    expect(plotBox!.width).toBeGreaterThan(outBox!.width * 0.9);
    await snapshot(out, "train-done");
  });

  it("draws a DPO run's reward margin, rewards and preference accuracy in a panel under the loss", async () => {
    // The second finished dashboard of the notebook (a windowed notebook draws a chart once it is scrolled to).
    const out = outputWith(panel, ".qwenbook-train[data-state='done']", 1);
    await out.scrollIntoViewIfNeeded();
    await expect(out.locator(".qwenbook-train-title").textContent()).resolves.toMatch(/^DPO beta=0\.1/);
    for (const trace of ["reward-margin", "reward-chosen", "reward-rejected", "reward-accuracy"]) {
      const line = out.locator(`g.trace${trace} path.js-line`);
      await line.waitFor({ timeout: 60_000 });
      expect(vertices(await line.getAttribute("d"))).toBe(PREFERENCE_STEPS);
    }
    // The reward panel sits below the loss panel, on the same steps.
    const lossBox = await out.locator("g.traceloss path.js-line").boundingBox();
    const marginBox = await out.locator("g.tracereward-margin path.js-line").boundingBox();
    expect(marginBox!.y).toBeGreaterThan(lossBox!.y + lossBox!.height - 1);
    const tiles = await out.locator(".qwenbook-metric-label").allTextContents();
    expect(tiles).toEqual(["loss", "eval loss", "learning rate", "reward margin", "preference accuracy"]);
    await snapshot(out, "train-preference");
  });

  it("shows a run in progress with ETA", async () => {
    const out = outputWith(panel, ".qwenbook-train[data-state='running']");
    await out.scrollIntoViewIfNeeded();
    await out.locator("g.traceloss path.js-line").waitFor({ timeout: 60_000 });
    expect(vertices(await out.locator("g.traceloss path.js-line").getAttribute("d"))).toBe(30);
    await expect(out.locator(".qwenbook-progress-text").textContent()).resolves.toMatch(/step 30 \/ 50 \(60%\).*ETA /);
    await out.locator("details.qwenbook-train-config summary").click();
    await expect(out.locator("details.qwenbook-train-config tr").count()).resolves.toBe(13);
    await snapshot(out, "train-running");
  });

  it("draws a gauge per GPU with numbers", async () => {
    const out = outputWith(panel, ".qwenbook-gauge[data-device='cuda:0']");
    await out.scrollIntoViewIfNeeded();
    const gauges = out.locator(".qwenbook-gauge");
    await expect(gauges.count()).resolves.toBe(2);
    await expect(gauges.first().locator(".qwenbook-dial-label").textContent()).resolves.toMatch(/^\d+%$/);
    await expect(gauges.first().locator(".qwenbook-stat-used .qwenbook-stat-value").textContent()).resolves.toBe("15.3 GiB");
    await expect(gauges.first().locator(".qwenbook-stat-total .qwenbook-stat-value").textContent()).resolves.toBe("79.6 GiB");
    await expect(gauges.nth(1).getAttribute("data-level")).resolves.toBe("high");
    await expect(gauges.first().locator(".qwenbook-sparkline-line").getAttribute("points")).resolves.toMatch(/^(\S+ ){59}\S+$/);
    await snapshot(out, "gpu");
  });

  it("labels a CPU-only worker's gauge as process RAM", async () => {
    const out = outputWith(panel, ".qwenbook-gauge[data-kind='cpu']");
    await out.scrollIntoViewIfNeeded();
    await expect(out.locator(".qwenbook-stat-used .qwenbook-stat-label").textContent()).resolves.toBe("process RAM");
    await expect(out.locator(".qwenbook-gauge-note").textContent()).resolves.toContain("CPU only");
    await snapshot(out, "gpu-cpu");
  });

  it("shows an error box for a malformed bundle and for a newer version", async () => {
    const bad = outputWith(panel, ".qwenbook-error");
    await bad.scrollIntoViewIfNeeded();
    await expect(bad.locator(".qwenbook-error-title").textContent()).resolves.toBe("This GPU memory gauge output is malformed");
    await expect(bad.locator(".qwenbook-error-detail").textContent()).resolves.toBe("/devices must be array");
    const newer = outputWith(panel, ".qwenbook-error", 1);
    await expect(newer.locator(".qwenbook-error-title").textContent()).resolves.toBe(
      "This training dashboard was written by a newer Qwenbook",
    );
    await snapshot(bad, "error-malformed");
    await snapshot(newer, "error-newer");
  });

  it("resizes the chart with the notebook", async () => {
    const out = outputWith(panel, ".qwenbook-train[data-state='done']");
    await out.scrollIntoViewIfNeeded();
    const svg = out.locator(".qwenbook-train-plot .main-svg").first();
    const before = (await svg.boundingBox())!.width;
    await page.setViewportSize({ width: 900, height: 1000 });
    try {
      await expect.poll(async () => (await svg.boundingBox())!.width, { timeout: 10_000 }).toBeLessThan(before - 200);
      const outWidth = (await out.boundingBox())!.width;
      expect((await svg.boundingBox())!.width).toBeLessThanOrEqual(outWidth + 1);
      await snapshot(out, "train-narrow");
    } finally {
      await page.setViewportSize({ width: 1280, height: 1000 });
    }
  });

  it("throws no page errors", () => {
    expect(pageErrors(page)).toEqual([]);
  });

  it("follows the dark theme", async () => {
    await setTheme(lab, "JupyterLab Dark");
    try {
      const dark = await newPage(browser);
      const darkPanel = await openNotebook(dark, lab, "widgets.ipynb");
      await dark.locator("body[data-jp-theme-light='false']").waitFor({ state: "attached", timeout: 30_000 });
      const chatOut = outputWith(darkPanel, ".qwenbook-chat[data-state='done']");
      const bubbleBg = await chatOut.locator(".qwenbook-msg-assistant .qwenbook-msg-body").evaluate((el) => getComputedStyle(el).backgroundColor);
      const textColor = await chatOut.locator(".qwenbook-msg-assistant .qwenbook-msg-body").evaluate((el) => getComputedStyle(el).color);
      // Light text on a dark bubble.
      expect(luminance(textColor)).toBeGreaterThan(luminance(bubbleBg) + 0.4);
      await snapshot(chatOut, "chat-dark");
      const train = outputWith(darkPanel, ".qwenbook-train[data-state='done']");
      await train.scrollIntoViewIfNeeded();
      await train.locator("g.traceloss path.js-line").waitFor({ timeout: 60_000 });
      const tick = await train.locator(".xtick text").first().evaluate((el) => getComputedStyle(el).fill);
      expect(luminance(tick)).toBeGreaterThan(0.5);
      await snapshot(train, "train-dark");
      const gpu = outputWith(darkPanel, ".qwenbook-gauge[data-device='cuda:0']");
      await snapshot(gpu, "gpu-dark");
      expect(pageErrors(dark)).toEqual([]);
    } finally {
      await setTheme(lab, "JupyterLab Light");
    }
  });
});

/** Relative luminance (0 dark .. 1 light) of a CSS rgb()/rgba() colour. */
function luminance(css: string): number {
  const [r, g, b] = (css.match(/[\d.]+/g) ?? ["0", "0", "0"]).slice(0, 3).map(Number);
  return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255;
}
