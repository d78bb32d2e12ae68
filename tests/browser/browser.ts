import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { chromium, type Browser, type Locator, type Page } from "playwright-core";
import { REPO } from "./lab";

export const ARTIFACTS = join(REPO, "tests", "browser", "artifacts");

export interface LabInfo {
  url: string;
  token: string;
  root: string;
}

/** Debian's Chromium, headless, with everything that would reach the network turned off. */
export async function launchBrowser(): Promise<Browser> {
  const executablePath = process.env.QWENBOOK_CHROMIUM ?? "/usr/bin/chromium";
  if (!existsSync(executablePath)) {
    throw new Error(
      `Chromium not found at ${executablePath}: install it (apt-get install -y chromium; npm test's setup does) or set QWENBOOK_CHROMIUM.`,
    );
  }
  return chromium.launch({
    executablePath,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

export async function newPage(browser: Browser): Promise<Page> {
  const context = await browser.newContext({ viewport: { width: 1280, height: 1000 }, deviceScaleFactor: 1 });
  const page = await context.newPage();
  const errors: string[] = [];
  page.on("pageerror", (e) => errors.push(e.stack ?? e.message));
  (page as Page & { qwenbookErrors?: string[] }).qwenbookErrors = errors;
  return page;
}

/**
 * Uncaught errors the page threw from Qwenbook's code so far. JupyterLab's own (for example its
 * debugger complaining about a kernel without debugging support) are not this suite's business.
 */
export function pageErrors(page: Page): string[] {
  const all = (page as Page & { qwenbookErrors?: string[] }).qwenbookErrors ?? [];
  return all.filter((e) => e.includes("qwenbook"));
}

/**
 * Waits for `target` to appear in `cell`'s output. Gives up early once the cell has finished running
 * without it (its prompt shows a number, not "*"); either way the error says what the cell showed
 * instead, and a screenshot of the page is saved.
 */
export async function waitForOutput(page: Page, cell: Locator, target: Locator, timeout: number, name: string): Promise<void> {
  const deadline = Date.now() + timeout;
  let finishedAt: number | undefined;
  let reason = `no ${name} output within ${timeout / 1000} s`;
  for (;;) {
    if ((await target.count()) > 0) return;
    const prompt = (await cell.locator(".jp-InputPrompt").textContent().catch(() => "")) ?? "";
    if (/\[\d+\]/.test(prompt)) {
      finishedAt ??= Date.now();
      // The last update may still be on its way after the kernel reports the cell done.
      if (Date.now() - finishedAt > 3_000) {
        reason = `the cell finished (${prompt.trim()}) without the expected output`;
        break;
      }
    }
    if (Date.now() > deadline) break;
    await page.waitForTimeout(250);
  }
  mkdirSync(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: join(ARTIFACTS, `${name}-failure.png`), fullPage: true }).catch(() => undefined);
  const shown = (await cell.locator(".jp-OutputArea").allInnerTexts().catch(() => [])).join("\n").trim();
  throw new Error(`${reason}\ncell output: ${shown || "(none)"}\nscreenshot: tests/browser/artifacts/${name}-failure.png`);
}

/** Writes `nb` into the server's root folder as `name`. */
/** The Qwen (TypeScript) kernelspec as a notebook's metadata names it. */
export const QWEN_KERNEL = { name: "qwen-ts", display_name: "Qwen (TypeScript)", language: "typescript" };

/** A notebook of code cells, given as [id, source] pairs, for `kernel` (the Qwen kernel unless named). */
export function codeNotebook(cells: ReadonlyArray<readonly [string, string]>, kernel: object = QWEN_KERNEL): object {
  return {
    nbformat: 4,
    nbformat_minor: 5,
    metadata: { kernelspec: kernel },
    cells: cells.map(([id, source]) => ({ cell_type: "code", id, execution_count: null, metadata: {}, source, outputs: [] })),
  };
}

export function writeNotebook(lab: LabInfo, name: string, nb: object): void {
  writeFileSync(join(lab.root, name), JSON.stringify(nb, null, 1));
}

let workspaces = 0;

/**
 * Opens a notebook in JupyterLab, in a workspace of its own so tabs another test left open are not
 * restored around it, and waits until its cells are on the page.
 */
export async function openNotebook(page: Page, lab: LabInfo, name: string): Promise<Locator> {
  workspaces += 1;
  const workspace = `test-${process.pid}-${workspaces}`;
  await page.goto(`${lab.url}/lab/workspaces/${workspace}/tree/${encodeURIComponent(name)}?reset&token=${lab.token}`);
  await page.locator("#jupyterlab-splash").waitFor({ state: "detached", timeout: 60_000 });
  const panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)");
  await panel.locator(".jp-Cell").first().waitFor({ timeout: 60_000 });
  return panel;
}

/**
 * Waits until the notebook's kernel is connected and idle. A cell run while the kernel is still
 * starting or connecting is dropped (or JupyterLab asks which kernel to start). The execution
 * indicator alone does not tell: it reads "idle" before any kernel exists, so the status bar's
 * "<kernel> | Idle" is what counts.
 */
export async function waitForIdleKernel(panel: Locator, timeout = 90_000): Promise<void> {
  await panel.page().waitForFunction(
    () =>
      Array.from(document.querySelectorAll("#jp-main-statusbar .jp-StatusBar-TextItem")).some((el) =>
        /^(?!No Kernel\b).+ \| Idle$/.test((el.textContent ?? "").trim()),
      ),
    undefined,
    { timeout, polling: 100 },
  );
}

/** Switches JupyterLab's theme through its settings API (the page must be reloaded to see it). */
export async function setTheme(lab: LabInfo, theme: "JupyterLab Light" | "JupyterLab Dark"): Promise<void> {
  const r = await fetch(`${lab.url}/lab/api/settings/@jupyterlab/apputils-extension:themes`, {
    method: "PUT",
    headers: { Authorization: `token ${lab.token}`, "Content-Type": "application/json" },
    body: JSON.stringify({ raw: JSON.stringify({ theme }) }),
  });
  if (!r.ok) throw new Error(`setting the theme failed: ${r.status} ${await r.text()}`);
}

/** Saves a screenshot of `target` under tests/browser/artifacts/. */
export async function snapshot(target: Locator, name: string): Promise<string> {
  mkdirSync(ARTIFACTS, { recursive: true });
  const path = join(ARTIFACTS, `${name}.png`);
  await target.scrollIntoViewIfNeeded();
  await target.screenshot({ path, animations: "disabled" });
  return path;
}

/** The output area holding the first element that matches `selector`. */
export function outputWith(panel: Locator, selector: string, nth = 0): Locator {
  return panel.locator(`.jp-OutputArea-output:has(${selector})`).nth(nth);
}
