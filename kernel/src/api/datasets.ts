import { existsSync, statSync } from "node:fs";
import { basename, isAbsolute } from "node:path";
import { inspect } from "node:util";
import type { DatasetSource } from "../bridge/protocol.gen";
import { checkRows, firstRows } from "./dataset-rows";
import { checkPreferenceRows } from "./preference-rows";
import { resolvePath } from "./paths";
import { expectInteger, expectKnownKeys, expectOneOf, expectString } from "./validate";

export type DatasetFormat = "auto" | "alpaca" | "sharegpt";
export const DATASET_FORMATS: readonly DatasetFormat[] = ["auto", "alpaca", "sharegpt"];

/** An instruction row: the answer to `instruction` (plus `input`) is `output`. */
export interface AlpacaRow {
  instruction: string;
  input?: string;
  output: string;
  system?: string;
  /** Earlier turns as [question, answer] pairs. */
  history?: ReadonlyArray<readonly [string, string]>;
}

/** A multi-turn chat; the loss falls on every assistant ("gpt") turn. */
export interface ShareGptRow {
  conversations: ReadonlyArray<{ from: "human" | "gpt" | "system" | "user" | "assistant"; value: string }>;
  system?: string;
}

export type DatasetRow = AlpacaRow | ShareGptRow;

export interface DatasetOptions {
  /** Row format; "auto" (the default) tells alpaca from sharegpt by the first row's fields. */
  format?: DatasetFormat;
  /** Rows to draw from this source (seeded); more than it holds cycles through it. */
  samples?: number;
  /** Label in reports and error messages. */
  name?: string;
}

export type SelfCognitionLanguage = "zh" | "en";

export interface SelfCognitionOptions {
  /** The name the model should give itself, e.g. "小黄". */
  name: string;
  /** Who made it, e.g. "魔搭". */
  author: string;
  /** Name in the English answers, e.g. "Xiao Huang"; default: `name`. */
  nameEn?: string;
  /** Author in the English answers, e.g. "ModelScope"; default: `author`. */
  authorEn?: string;
  /** Halves of the set to use; default both. */
  languages?: readonly SelfCognitionLanguage[];
}

/**
 * The built-in self-cognition set: identity questions and answers in Chinese and English with the
 * model's new name and author filled in, as in the ms-swift tutorial. Mix it with ordinary
 * instruction data (`.dataset(a, { samples: 500 }).dataset(b, { samples: 500 })`) so the model
 * keeps its other skills.
 */
export class SelfCognition {
  readonly name: string;
  readonly author: string;
  readonly nameEn: string | undefined;
  readonly authorEn: string | undefined;
  readonly languages: readonly SelfCognitionLanguage[] | undefined;

  constructor(options: SelfCognitionOptions) {
    const o = expectKnownKeys("selfCognition(options)", options, ["name", "author", "nameEn", "authorEn", "languages"]);
    if (o.name === undefined || o.author === undefined) {
      throw new TypeError('selfCognition() needs the identity to teach: selfCognition({ name: "小黄", author: "魔搭" })');
    }
    this.name = nonBlank("selfCognition option name", o.name);
    this.author = nonBlank("selfCognition option author", o.author);
    this.nameEn = o.nameEn === undefined ? undefined : nonBlank("selfCognition option nameEn", o.nameEn);
    this.authorEn = o.authorEn === undefined ? undefined : nonBlank("selfCognition option authorEn", o.authorEn);
    if (o.languages !== undefined) {
      if (!Array.isArray(o.languages) || o.languages.length === 0) {
        throw new TypeError('selfCognition option languages expects a non-empty list of "zh" and "en"');
      }
      this.languages = Object.freeze(o.languages.map((l: unknown, i: number) => expectOneOf(`selfCognition option languages[${i}]`, l, ["zh", "en"] as const)));
    }
    Object.freeze(this);
  }

  /** The wire form the worker expands into rows. */
  toWire(): NonNullable<DatasetSource["self_cognition"]> {
    return {
      name: this.name,
      author: this.author,
      ...(this.nameEn === undefined ? {} : { name_en: this.nameEn }),
      ...(this.authorEn === undefined ? {} : { author_en: this.authorEn }),
      ...(this.languages === undefined ? {} : { languages: [...this.languages] }),
    };
  }

  toString(): string {
    return `selfCognition(${this.name}, ${this.author})`;
  }
}

Object.defineProperty(SelfCognition.prototype, inspect.custom, {
  value(this: SelfCognition): string {
    return this.toString();
  },
});

/** `qwen.datasets`: built-in data to mix into a fine-tuning run. */
export const datasets = {
  selfCognition(options: SelfCognitionOptions): SelfCognition {
    return new SelfCognition(options);
  },
};

/** Anything `.dataset(...)` accepts: a .json/.jsonl file, rows, or a built-in set. */
export type DatasetInput = string | readonly DatasetRow[] | SelfCognition;

/** One dataset of a run: its wire form and a short label for toString and the dashboard. */
export interface DatasetEntry {
  readonly wire: DatasetSource;
  readonly label: string;
}

/**
 * Checks a `.dataset(source, options)` call and turns it into the wire form (paths made absolute). A
 * preference run's rows are `{ prompt | messages, chosen, rejected }`, checked as such.
 */
export function datasetEntry(source: unknown, options: unknown, cwd: string = process.cwd(), preference = false): DatasetEntry {
  const o = expectKnownKeys("dataset(source, options)", options, ["format", "samples", "name"]);
  if (preference && o.format !== undefined) {
    throw new RangeError("dataset option format does not apply to a preference run: its rows are { prompt | messages, chosen, rejected }; leave format out");
  }
  if (preference && source instanceof SelfCognition) {
    throw new TypeError("selfCognition() rows are supervised answers, not chosen/rejected pairs; train them with m.lora() first");
  }
  const check = (file: string, rows: ReadonlyArray<readonly [number, unknown]>) =>
    preference ? checkPreferenceRows(file, rows) : checkRows(file, extra.format ?? "auto", rows);
  const extra: Omit<DatasetSource, "path" | "rows" | "self_cognition"> = {};
  if (o.format !== undefined) extra.format = expectOneOf("dataset option format", o.format, DATASET_FORMATS);
  if (o.samples !== undefined) extra.samples = expectInteger("dataset option samples", o.samples, { min: 1 });
  if (o.name !== undefined) extra.name = expectString("dataset option name", o.name, { nonEmpty: true });
  const suffix = (label: string) => {
    const bits = [extra.format && extra.format !== "auto" ? extra.format : "", extra.samples ? `${extra.samples} samples` : ""].filter(Boolean);
    return bits.length ? `${label} (${bits.join(", ")})` : label;
  };
  if (source instanceof SelfCognition) {
    if (extra.format !== undefined && extra.format !== "alpaca" && extra.format !== "auto") {
      throw new RangeError(`selfCognition() rows are alpaca rows; leave format out (got ${JSON.stringify(extra.format)})`);
    }
    return { wire: { self_cognition: source.toWire(), ...extra }, label: suffix(extra.name ?? source.toString()) };
  }
  if (typeof source === "string") {
    const given = expectString("dataset(path)", source, { nonEmpty: true });
    const path = resolvePath(given, cwd);
    if (!existsSync(path)) {
      const from = isAbsolute(given) ? "" : ` (from ${JSON.stringify(given)}, relative to ${cwd})`;
      throw new Error(`Dataset file not found: ${path}${from}; pass a .json or .jsonl file of rows`);
    }
    if (!statSync(path).isFile()) throw new Error(`${path} is a folder; pass a .json or .jsonl file of rows`);
    // The first rows, against the format given (or the one "auto" picks), as the worker will read them.
    check(path, firstRows(path));
    return { wire: { path, ...extra }, label: suffix(extra.name ?? basename(path)) };
  }
  if (Array.isArray(source)) {
    if (source.length === 0) throw new RangeError("dataset(rows) got an empty list; pass at least one row");
    source.forEach((row: unknown, i: number) => {
      if (typeof row !== "object" || row === null || Array.isArray(row)) {
        throw new TypeError(`dataset(rows): row ${i + 1} must be an object like { instruction, input, output } or { conversations: [...] }`);
      }
    });
    const rows = JSON.parse(JSON.stringify(source)) as Array<Record<string, unknown>>; // a snapshot: later edits to the array do not change the run
    check(extra.name ?? "dataset(rows)", rows.map((row, i) => [i + 1, row] as const));
    return { wire: { rows, ...extra }, label: suffix(extra.name ?? `${rows.length} rows`) };
  }
  throw new TypeError(
    "dataset(source) expects a .json/.jsonl file path, a list of rows, or qwen.datasets.selfCognition({ name, author }), " +
      `got ${source === null ? "null" : typeof source}`,
  );
}

function nonBlank(name: string, value: unknown): string {
  const s = expectString(name, value, { nonEmpty: true });
  if (s.trim() === "") throw new RangeError(`${name} must not be blank`);
  return s;
}
