import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const repo = join(new URL(".", import.meta.url).pathname, "..", "..");
const python = process.env.QWENBOOK_PYTHON ?? join(repo, ".venv", "bin", "python");

export interface CellOutput {
  output_type: string;
  name?: string;
  text?: string | string[];
  data?: Record<string, unknown>;
  ename?: string;
  evalue?: string;
}
export interface Cell {
  cell_type: string;
  source: string | string[];
  outputs?: CellOutput[];
}
export interface ExecutedNotebook {
  cells: Cell[];
  seconds: number;
  stderr: string;
  status: number | null;
}

const joinText = (t: string | string[] | undefined): string => (Array.isArray(t) ? t.join("") : t ?? "");

/**
 * Executes <dir>/<name> (default: the repository's notebooks/) with the Qwen kernel through nbclient
 * and returns the executed cells. The kernel runs in <dir>, so relative paths in the notebook land there.
 */
export function executeNotebook(name: string, env: Record<string, string> = {}, dir: string = join(repo, "notebooks")): ExecutedNotebook {
  const out = join(mkdtempSync(join(tmpdir(), "qwenbook-nb-")), name);
  const r = spawnSync(python, [join(repo, "tests", "notebooks", "execute.py"), join(dir, name), out], {
    env: { ...process.env, ...env },
    encoding: "utf8",
    timeout: 900_000,
  });
  const nb = JSON.parse(readFileSync(out, "utf8")) as { cells: Cell[]; metadata: { qwenbook_run_seconds: number } };
  return { cells: nb.cells, seconds: nb.metadata.qwenbook_run_seconds, stderr: r.stderr, status: r.status };
}

/**
 * executeNotebook without blocking the test process: vitest's own messages keep flowing during a run of minutes,
 * and other work (a model build) can go on beside it. Fills and returns `into`, so that tests declared before
 * the run (at collection) read the executed notebook once their beforeAll has awaited this.
 */
export function executeNotebookAsync(
  name: string,
  env: Record<string, string>,
  dir: string,
  into: ExecutedNotebook = { cells: [], seconds: 0, stderr: "", status: null },
): Promise<ExecutedNotebook> {
  const out = join(mkdtempSync(join(tmpdir(), "qwenbook-nb-")), name);
  const child = spawn(python, [join(repo, "tests", "notebooks", "execute.py"), join(dir, name), out], {
    env: { ...process.env, ...env },
    stdio: ["ignore", "ignore", "pipe"],
    timeout: 900_000,
  });
  let stderr = "";
  child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
  return new Promise((resolve, reject) => {
    child.once("error", reject);
    child.once("close", (status) => {
      try {
        const nb = JSON.parse(readFileSync(out, "utf8")) as { cells: Cell[]; metadata: { qwenbook_run_seconds: number } };
        resolve(Object.assign(into, { cells: nb.cells, seconds: nb.metadata.qwenbook_run_seconds, stderr, status }));
      } catch (e) {
        reject(new Error(`${name} left no executed notebook (exit ${status}): ${(e as Error).message}\n${stderr}`));
      }
    });
  });
}

export const sourceOf = (c: Cell): string => joinText(c.source);
export const streamText = (c: Cell): string =>
  (c.outputs ?? []).filter((o) => o.output_type === "stream").map((o) => joinText(o.text)).join("");
export const errorsOf = (nb: ExecutedNotebook): CellOutput[] =>
  nb.cells.flatMap((c) => (c.outputs ?? []).filter((o) => o.output_type === "error"));
/** The cell whose source contains `needle`; throws when none does, so a renamed cell fails loudly. */
export function cellWith(nb: ExecutedNotebook, needle: string): Cell {
  const c = nb.cells.find((x) => x.cell_type === "code" && sourceOf(x).includes(needle));
  if (!c) throw new Error(`no code cell contains ${JSON.stringify(needle)}`);
  return c;
}
/** Parses the last JSON line a cell printed. */
export function jsonOf<T>(c: Cell): T {
  const lines = streamText(c).trim().split("\n").filter((l) => l.startsWith("{"));
  if (lines.length === 0) throw new Error(`cell printed no JSON line: ${streamText(c)}`);
  return JSON.parse(lines[lines.length - 1]) as T;
}

const CHAT_MIME = "application/vnd.qwenbook.chat+json";

export interface ChatOutput {
  chat: {
    state: string;
    messages: { role: string; content: string }[];
    /** A conversation's turns before this one (folded behind "N earlier turns"). */
    earlier?: { role: string; content: string }[];
    stats?: { completionTokens: number; finishReason?: string };
  };
  /** The text/plain form saved beside it for front ends without the extension. */
  plain: string;
}

/** The chat widgets a cell shows, as saved (their final state). */
export function chatOutputs(c: Cell): ChatOutput[] {
  return (c.outputs ?? [])
    .filter((o) => o.output_type === "display_data" && o.data?.[CHAT_MIME] !== undefined)
    .map((o) => ({ chat: o.data![CHAT_MIME] as ChatOutput["chat"], plain: joinText(o.data!["text/plain"] as string | string[]) }));
}
