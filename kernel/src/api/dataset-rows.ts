// Early checks of training rows, so a file in the wrong format fails at `.dataset()` and not minutes
// later at `train()`. The rules mirror the worker's parser (python-bridge/qwenbook_bridge/engine/
// data.py: detect_format, alpaca_to_messages, sharegpt_to_messages): a row accepted here is
// accepted there, and the error names the same row and field. The worker still checks every row;
// for a file only the first rows are read here, so a large file costs no more than its start.

import { closeSync, openSync, readSync } from "node:fs";
import { extname } from "node:path";
import { StringDecoder } from "node:string_decoder";

export type RowFormat = "alpaca" | "sharegpt";

/** How many rows of a file are checked at `.dataset()`. */
export const ROWS_CHECKED = 20;
/** Most bytes read from the start of a file to find those rows; rows past it are left to the worker. */
export const BYTES_CHECKED = 4 * 1024 * 1024;
const CHUNK = 64 * 1024;

const USER_ROLES = new Set(["human", "user"]);
const ASSISTANT_ROLES = new Set(["gpt", "assistant", "model"]);

/** A row the worker would refuse; `row` is 1-based (for JSONL, the line number), as in the worker. */
export class DatasetRowError extends Error {
  constructor(
    readonly file: string,
    readonly row: number | undefined,
    readonly field: string | undefined,
    readonly reason: string,
  ) {
    super(`${file}${row === undefined ? "" : `, row ${row}`}${field === undefined ? "" : `, field "${field}"`}: ${reason}`);
    this.name = "DatasetRowError";
  }
}

/** The format the worker's "auto" picks for a row, from its fields; undefined when it cannot tell. */
export function detectFormat(row: unknown): RowFormat | undefined {
  if (!isObject(row)) return undefined;
  if ("conversations" in row || "messages" in row) return "sharegpt";
  if ("instruction" in row || "output" in row) return "alpaca";
  return undefined;
}

/**
 * Checks rows against `format` ("auto": the first row's, as the worker decides) and throws a
 * DatasetRowError for the first row the worker would refuse, with a hint when the rows look like
 * another format. `rows` are [row number, value] pairs.
 */
export function checkRows(file: string, format: RowFormat | "auto", rows: ReadonlyArray<readonly [number, unknown]>): RowFormat | undefined {
  if (rows.length === 0) return undefined;
  let fmt: RowFormat;
  if (format === "auto") {
    const [n, first] = rows[0];
    const detected = detectFormat(first);
    if (!detected) {
      throw new DatasetRowError(
        file,
        n,
        undefined,
        'cannot tell the format: alpaca rows have "instruction" and "output", sharegpt rows have "conversations"; pass format explicitly' +
          lookalikeHint(first),
      );
    }
    fmt = detected;
  } else {
    fmt = format;
  }
  for (const [n, row] of rows) {
    const problem = fmt === "alpaca" ? alpacaProblem(row) : sharegptProblem(row);
    if (!problem) continue;
    const other = detectFormat(row);
    const hint =
      other && other !== fmt
        ? `; this looks like ${other} rows (${other === "alpaca" ? "{ instruction, input, output }" : "{ conversations: [...] }"}): use format: "${other}"`
        : lookalikeHint(row);
    throw new DatasetRowError(file, n, problem.field, `${problem.reason} (checked as format "${fmt}")${hint}`);
  }
  return fmt;
}

/** The rows' shape when it is a known one the worker does not take, and what to do instead. */
function lookalikeHint(row: unknown): string {
  if (isObject(row) && "query" in row && "response" in row) {
    return (
      "; this looks like ms-swift self-cognition rows ({ query, response }): for the built-in identity set use " +
      "qwen.datasets.selfCognition({ name, author }), or rename query/response to instruction/output (alpaca)"
    );
  }
  if (isObject(row) && "prompt" in row && ("completion" in row || "response" in row)) {
    return '; this looks like prompt/completion rows: rename them to instruction/output and use format: "alpaca"';
  }
  return "";
}

interface Problem {
  field?: string;
  reason: string;
}

function typeName(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "list";
  if (typeof value === "string") return "str";
  if (typeof value === "number") return Number.isInteger(value) ? "int" : "float";
  if (typeof value === "boolean") return "bool";
  return typeof value === "object" ? "dict" : typeof value;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** data.py `_text`: absent or null is missing; anything but a string is refused. */
function textProblem(row: Record<string, unknown>, key: string, required: boolean): Problem | undefined {
  const value = row[key];
  if (value === undefined || value === null) return required ? { field: key, reason: "is missing" } : undefined;
  if (typeof value !== "string") return { field: key, reason: `must be a string, got ${typeName(value)}` };
  return undefined;
}

/** data.py `alpaca_to_messages`. */
export function alpacaProblem(row: unknown): Problem | undefined {
  if (!isObject(row)) return { reason: `must be an object, got ${typeName(row)}` };
  for (const [key, required] of [["instruction", true], ["output", true], ["input", false], ["system", false]] as const) {
    const p = textProblem(row, key, required);
    if (p) return p;
  }
  const history = row.history;
  if (history === undefined || history === null) return undefined;
  if (!Array.isArray(history)) return { field: "history", reason: "must be a list of [question, answer] pairs" };
  for (let i = 0; i < history.length; i++) {
    const pair: unknown = history[i];
    if (!Array.isArray(pair) || pair.length !== 2 || !pair.every((x) => typeof x === "string")) {
      return { field: `history[${i}]`, reason: "must be a [question, answer] pair of strings" };
    }
  }
  return undefined;
}

/** data.py `sharegpt_to_messages`: known roles, alternating user/assistant, ending with the assistant. */
export function sharegptProblem(row: unknown): Problem | undefined {
  if (!isObject(row)) return { reason: `must be an object, got ${typeName(row)}` };
  const key = "conversations" in row ? "conversations" : "messages" in row ? "messages" : undefined;
  if (key === undefined) return { field: "conversations", reason: "is missing" };
  const turns = row[key];
  if (!Array.isArray(turns) || turns.length === 0) return { field: key, reason: "must be a non-empty list of turns" };
  const system = textProblem(row, "system", false);
  if (system) return system;
  const roles: string[] = typeof row.system === "string" && row.system !== "" ? ["system"] : [];
  for (let i = 0; i < turns.length; i++) {
    const where = `${key}[${i}]`;
    const turn: unknown = turns[i];
    if (!isObject(turn)) return { field: where, reason: `must be an object, got ${typeName(turn)}` };
    const roleKey = "from" in turn ? "from" : "role" in turn ? "role" : undefined;
    const textKey = "value" in turn ? "value" : "content" in turn ? "content" : undefined;
    if (roleKey === undefined) return { field: `${where}.from`, reason: 'is missing (each turn needs "from" or "role")' };
    if (textKey === undefined) return { field: `${where}.value`, reason: 'is missing (each turn needs "value" or "content")' };
    const rawRole = turn[roleKey];
    const content = turn[textKey];
    if (typeof content !== "string") return { field: `${where}.${textKey}`, reason: `must be a string, got ${typeName(content)}` };
    const name = typeof rawRole === "string" ? rawRole.trim().toLowerCase() : "";
    const role = USER_ROLES.has(name) ? "user" : ASSISTANT_ROLES.has(name) ? "assistant" : name === "system" ? "system" : undefined;
    if (role === undefined) {
      return { field: `${where}.${roleKey}`, reason: `unknown role ${JSON.stringify(rawRole)}; use human/user, gpt/assistant or system` };
    }
    if (role === "system") {
      if (roles.length > 0) return { field: `${where}.${roleKey}`, reason: "a system turn may only come first" };
      roles.push("system");
      continue;
    }
    const previous = roles.length > 0 ? roles[roles.length - 1] : "system";
    const expected = previous === "user" ? "assistant" : "user";
    if (role !== expected) {
      return {
        field: `${where}.${roleKey}`,
        reason: `turns must alternate user/assistant starting with the user; expected ${expected} here, got ${JSON.stringify(rawRole)}`,
      };
    }
    roles.push(role);
  }
  if (roles[roles.length - 1] !== "assistant") {
    return {
      field: `${key}[${turns.length - 1}]`,
      reason: "the last turn must be the assistant's (nothing would be learned from a trailing user turn)",
    };
  }
  return undefined;
}

/**
 * Up to `max` [row number, value] pairs from the start of a .json (a list of rows) or .jsonl file,
 * numbered as the worker numbers them (list position, or line number). Reads only as much of the
 * file as those rows need, at most BYTES_CHECKED; a row that does not fit ends the list early
 * (the worker checks it). Throws DatasetRowError where the worker would refuse the file as a whole
 * or a line of it is not JSON.
 */
export function firstRows(path: string, max = ROWS_CHECKED): Array<[number, unknown]> {
  const reader = new PrefixReader(path);
  try {
    reader.fill(1);
    let text = reader.text.replace(/^\uFEFF/, "");
    let start = text.length - text.trimStart().length;
    while (start === text.length && !reader.eof) {
      reader.fill(reader.text.length + CHUNK);
      text = reader.text.replace(/^\uFEFF/, "");
      start = text.length - text.trimStart().length;
    }
    if (start === text.length) throw new DatasetRowError(path, undefined, undefined, "is empty");
    const jsonl = extname(path).toLowerCase() === ".jsonl" || text[start] === "{";
    return jsonl ? jsonlRows(reader, path, max) : arrayRows(reader, path, max);
  } finally {
    reader.close();
  }
}

/** The start of a file as text, read in chunks on demand. */
class PrefixReader {
  text = "";
  eof = false;
  readonly #fd: number;
  readonly #decoder = new StringDecoder("utf8");
  #bytes = 0;

  constructor(path: string) {
    this.#fd = openSync(path, "r");
  }

  /** Reads until the text holds at least `chars` characters, the file ends, or BYTES_CHECKED is reached. */
  fill(chars: number): void {
    const buffer = Buffer.alloc(CHUNK);
    while (this.text.length < chars && !this.eof && this.#bytes < BYTES_CHECKED) {
      const n = readSync(this.#fd, buffer, 0, CHUNK, this.#bytes);
      if (n === 0) {
        this.eof = true;
        this.text += this.#decoder.end();
        break;
      }
      this.#bytes += n;
      this.text += this.#decoder.write(buffer.subarray(0, n));
    }
  }

  /** More text, if the file and the byte budget allow; false when there is no more. */
  more(): boolean {
    if (this.eof || this.#bytes >= BYTES_CHECKED) return false;
    this.fill(this.text.length + 1);
    return true;
  }

  close(): void {
    closeSync(this.#fd);
  }
}

function jsonlRows(reader: PrefixReader, path: string, max: number): Array<[number, unknown]> {
  const rows: Array<[number, unknown]> = [];
  let lineno = 0;
  let offset = 0;
  for (;;) {
    const text = reader.text;
    const end = text.slice(offset).search(/\r\n|\n|\r/);
    if (end < 0 && reader.more()) continue; // the line goes on past what was read
    const line = end < 0 ? text.slice(offset) : text.slice(offset, offset + end);
    if (end < 0 && !reader.eof) return rows; // a line longer than the byte budget: the worker checks it
    lineno += 1;
    const trimmed = line.replace(/^\uFEFF/, "").trim();
    if (trimmed !== "") {
      try {
        rows.push([lineno, JSON.parse(trimmed)]);
      } catch (error) {
        if (extname(path).toLowerCase() !== ".jsonl") wholeObject(reader, path); // one pretty-printed object
        throw new DatasetRowError(path, lineno, undefined, `line ${lineno} is not valid JSON: ${(error as Error).message}`);
      }
      if (rows.length >= max) return rows;
    }
    if (end < 0) break;
    offset += end + (text.startsWith("\r\n", offset + end) ? 2 : 1);
  }
  if (rows.length === 0) throw new DatasetRowError(path, undefined, undefined, "is empty");
  if (rows.length === 1 && extname(path).toLowerCase() !== ".jsonl") {
    // The worker parses a .json file whole first: a single object there is not a list of rows.
    throw new DatasetRowError(path, undefined, undefined, "holds a JSON object; expected a list of rows ([{...}, {...}]) or JSONL");
  }
  return rows;
}

/** Throws the worker's "holds a JSON object" error when the whole (small) file is one JSON object. */
function wholeObject(reader: PrefixReader, path: string): void {
  while (reader.more());
  if (!reader.eof) return;
  try {
    JSON.parse(reader.text.replace(/^\uFEFF/, ""));
  } catch {
    return;
  }
  throw new DatasetRowError(path, undefined, undefined, "holds a JSON object; expected a list of rows ([{...}, {...}]) or JSONL");
}

/** Elements of a top-level JSON array, found by tracking strings and nesting, each parsed alone. */
function arrayRows(reader: PrefixReader, path: string, max: number): Array<[number, unknown]> {
  const rows: Array<[number, unknown]> = [];
  let i = reader.text.search(/\S/);
  if (reader.text[i] === "\uFEFF") i = reader.text.slice(i + 1).search(/\S/) + i + 1;
  if (reader.text[i] !== "[") {
    // Not a list: the worker says why; parse what is there to give the same answer early when the file is small.
    if (reader.eof) {
      let value: unknown;
      try {
        value = JSON.parse(reader.text.replace(/^\uFEFF/, ""));
      } catch (error) {
        throw new DatasetRowError(path, undefined, undefined, `is not valid JSON: ${(error as Error).message}`);
      }
      throw new DatasetRowError(path, undefined, undefined, `holds a JSON ${typeName(value)}; expected a list of rows`);
    }
    return rows;
  }
  let pos = i + 1;
  let start = pos;
  let depth = 0;
  let inString = false;
  let escaped = false;
  for (;;) {
    if (pos >= reader.text.length) {
      if (!reader.more()) return rows; // file or byte budget ended inside the list: the worker checks the rest
      continue;
    }
    const c = reader.text[pos];
    if (inString) {
      if (escaped) escaped = false;
      else if (c === "\\") escaped = true;
      else if (c === '"') inString = false;
    } else if (c === '"') {
      inString = true;
    } else if (c === "[" || c === "{") {
      depth += 1;
    } else if (c === "]" || c === "}") {
      if (depth === 0) {
        // c is the list's closing bracket
        const last = reader.text.slice(start, pos).trim();
        if (last !== "") pushElement(rows, path, last);
        if (rows.length === 0) throw new DatasetRowError(path, undefined, undefined, "holds an empty list");
        return rows;
      }
      depth -= 1;
    } else if (c === "," && depth === 0) {
      pushElement(rows, path, reader.text.slice(start, pos).trim());
      if (rows.length >= max) return rows;
      start = pos + 1;
    }
    pos += 1;
  }
}

function pushElement(rows: Array<[number, unknown]>, path: string, text: string): void {
  const n = rows.length + 1;
  try {
    rows.push([n, JSON.parse(text)]);
  } catch (error) {
    throw new DatasetRowError(path, n, undefined, `is not valid JSON: ${(error as Error).message}`);
  }
}
