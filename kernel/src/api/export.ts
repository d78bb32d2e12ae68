import { randomUUID } from "node:crypto";
import { existsSync, statSync } from "node:fs";
import { basename, join } from "node:path";
import type { WorkerClient } from "../bridge/client";
import type { ExportProgressEvent, ExportRequest, QuantOptions, SaveRequest } from "../bridge/protocol.gen";
import type { DisplaySink } from "../display/sink";
import { createThrottle, type ThrottleOptions } from "../display/throttle";
import { resolvePath } from "./paths";
import { ExportReport, formatSize } from "./report";
import { GROUP_SIZES, type GroupSize, type LoadQuant } from "./types";
import { expectBoolean, expectInteger, expectKnownKeys, expectOneOf, expectString } from "./validate";

export type SaveQuant = "int8" | "int4";
export type SaveDtype = "bf16" | "fp16" | "fp32";
export type GgufType = "f32" | "f16" | "bf16" | "q8_0" | "q4_0" | "q4_k_m" | "q5_k_m" | "q6_k";
export const GGUF_TYPES: readonly GgufType[] = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"];

export interface SaveOptions {
  /** Largest safetensors file: "2GB" (the default), "500MB", "1.5GiB", or a number of bytes. */
  shardSize?: string | number;
  /** Cast floating-point weights on the way out; default: as held. */
  dtype?: SaveDtype;
  /** Replace a target folder that exists and is not empty. */
  overwrite?: boolean;
  /** Save int8/int4 weights (a model loaded quantized is saved quantized without this). */
  quant?: SaveQuant;
  /** int4: input columns sharing one scale (32, 64 or 128). */
  groupSize?: GroupSize;
  /** int4: a .txt/.json/.jsonl file of texts for GPTQ rounding. */
  calibration?: string;
  /** Adapter folder(s) to merge in while saving (what `model.merge({ adapter })` does). */
  adapter?: string | readonly string[];
  /** Print no progress lines and no report table. */
  quiet?: boolean;
}

export interface ExportOptions {
  /** Only "gguf" (llama.cpp, Ollama, LM Studio) for now; the default. */
  format?: "gguf";
  /**
   * Weight type; default "f16". "q8_0" / "q4_0": every matrix that type; "q4_k_m", "q5_k_m", "q6_k": llama.cpp's
   * K-quant mixes (per-tensor types as llama-quantize picks them). Upper case ("Q4_K_M") is accepted too.
   */
  type?: GgufType | Uppercase<GgufType>;
  /** Also write an Ollama Modelfile beside the file (`ollama create name -f <file>.Modelfile`); default true. */
  modelfile?: boolean;
  /** Adapter folder(s) to merge in. */
  adapter?: string | readonly string[];
  /** Replace a file that exists. */
  overwrite?: boolean;
  /** Print no progress lines and no report table. */
  quiet?: boolean;
}

const SAVE_KEYS = ["shardSize", "dtype", "overwrite", "quant", "groupSize", "calibration", "adapter", "quiet"] as const;
const EXPORT_KEYS = ["format", "type", "modelfile", "adapter", "overwrite", "quiet"] as const;
const SIZE = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$/i;

/** What a save or export runs against: a loaded model, reached through its worker connection. */
export interface ExportTarget {
  /** The model's handle, for progress labels. */
  readonly label: string;
  sink(): DisplaySink;
  /** A connection whose worker has the model loaded (loading it again after a worker restart), and its handle there. */
  connect(): Promise<{ client: WorkerClient; modelId: string }>;
}


/** Checks a shard size the way the worker reads it ("2GB", "500MB", "1.5GiB", bytes) and returns it as sent. */
export function checkShardSize(value: unknown, name = "save option shardSize"): string {
  const hint = `a size like "2GB", "500MB" or "1.5GiB", or a whole number of bytes`;
  if (typeof value === "number") {
    if (!Number.isSafeInteger(value) || value < 1) throw new RangeError(`${name} must be ${hint}, got ${value}`);
    return String(value);
  }
  if (typeof value !== "string") throw new TypeError(`${name} expects ${hint}, got ${value === null ? "null" : typeof value}`);
  const m = SIZE.exec(value);
  const inBytes = !m?.[2] || m[2].toLowerCase() === "b";
  if (!m || Number(m[1]) <= 0 || (inBytes && !Number.isInteger(Number(m[1])))) {
    throw new RangeError(`${name} must be ${hint}, got ${JSON.stringify(value)}`);
  }
  return value.trim();
}

/** Adapter folder(s): each must exist and hold adapter_config.json. Returns absolute paths. */
export function checkAdapters(value: unknown, name: string, cwd: string = process.cwd()): string[] {
  const list = typeof value === "string" ? [value] : value;
  if (!Array.isArray(list) || list.length === 0) {
    throw new TypeError(`${name} expects an adapter folder or a non-empty list of them, got ${JSON.stringify(value) ?? String(value)}`);
  }
  return list.map((item, i) => {
    const given = expectString(list.length > 1 ? `${name}[${i}]` : name, item, { nonEmpty: true });
    const abs = resolvePath(given, cwd);
    if (!existsSync(abs) || !statSync(abs).isDirectory()) {
      throw new Error(`No adapter folder at ${abs} (from ${JSON.stringify(given)}): pass the folder training wrote, which holds adapter_config.json`);
    }
    if (!existsSync(join(abs, "adapter_config.json"))) {
      const full = existsSync(join(abs, "config.json")) ? "; it is a full model folder, so load it with qwen.load() instead" : "";
      throw new Error(`${abs} is not a LoRA adapter folder: it has no adapter_config.json${full}`);
    }
    return abs;
  });
}

/**
 * The wire form of quant / groupSize / calibration, or undefined without quant. groupSize and
 * calibration belong to int4; a calibration file must exist now, not fail in the worker later.
 */
export function quantOptions(
  where: string,
  o: Record<string, unknown>,
  allowed: readonly LoadQuant[],
  cwd: string = process.cwd(),
): QuantOptions | undefined {
  if (o.quant === undefined) {
    for (const k of ["groupSize", "calibration"]) {
      if (o[k] !== undefined) throw new TypeError(`${where} option ${k} applies to quant: "int4"; add quant: "int4" or leave ${k} out`);
    }
    return undefined;
  }
  if (o.quant === "nf4" && !allowed.includes("nf4")) {
    throw new RangeError(`${where} option quant "nf4" cannot be saved by Qwenbook (bitsandbytes' format); use "int8" or "int4"`);
  }
  const method = expectOneOf(`${where} option quant`, o.quant, allowed);
  const out: QuantOptions = { method };
  if (o.groupSize !== undefined || o.calibration !== undefined) {
    if (method !== "int4") throw new TypeError(`${where} options groupSize and calibration apply to quant: "int4", not "${method}"`);
  }
  if (o.groupSize !== undefined) {
    const g = expectInteger(`${where} option groupSize`, o.groupSize);
    if (!(GROUP_SIZES as readonly number[]).includes(g)) throw new RangeError(`${where} option groupSize must be 32, 64 or 128, got ${g}`);
    out.group_size = g as GroupSize;
  }
  if (o.calibration !== undefined) {
    const given = expectString(`${where} option calibration`, o.calibration, { nonEmpty: true });
    const abs = resolvePath(given, cwd);
    if (!existsSync(abs) || !statSync(abs).isFile()) throw new Error(`No calibration file at ${abs} (from ${JSON.stringify(given)})`);
    if (!/\.(txt|json|jsonl)$/i.test(abs)) {
      throw new RangeError(`${where} option calibration must be a .txt, .json or .jsonl file of texts, got ${basename(abs)}`);
    }
    out.calibration = abs;
  }
  return out;
}

type Body<R> = Omit<R, "model_id">;

export function saveRequest(path: unknown, options: unknown, cwd: string = process.cwd()): { body: Body<SaveRequest>; quiet: boolean } {
  const target = resolvePath(expectString("save(path)", path, { nonEmpty: true }), cwd);
  const o = expectKnownKeys("save(path, options)", options, SAVE_KEYS);
  const body: Body<SaveRequest> = { target };
  if (o.shardSize !== undefined) body.shard_size = checkShardSize(o.shardSize);
  if (o.dtype !== undefined) body.dtype = expectOneOf("save option dtype", o.dtype, ["bf16", "fp16", "fp32"] as const);
  if (o.overwrite !== undefined) body.overwrite = expectBoolean("save option overwrite", o.overwrite);
  const quant = quantOptions("save", o, ["int8", "int4"], cwd);
  if (quant) body.quant = quant;
  if (o.adapter !== undefined) body.adapters = checkAdapters(o.adapter, "save option adapter", cwd);
  return { body, quiet: o.quiet === undefined ? false : expectBoolean("save option quiet", o.quiet) };
}

export function exportRequest(path: unknown, options: unknown, cwd: string = process.cwd()): { body: Body<ExportRequest>; quiet: boolean } {
  const given = expectString("export(path)", path, { nonEmpty: true });
  const o = expectKnownKeys("export(path, options)", options, EXPORT_KEYS);
  const format = o.format === undefined ? "gguf" : expectOneOf("export option format", o.format, ["gguf"] as const);
  if (!given.toLowerCase().endsWith(".gguf")) {
    throw new RangeError(`export(path) writes one GGUF file: give a file name ending in .gguf, got ${JSON.stringify(given)}`);
  }
  const body: Body<ExportRequest> = { target: resolvePath(given, cwd), format };
  if (o.type !== undefined) {
    body.type = expectOneOf("export option type", typeof o.type === "string" ? o.type.toLowerCase() : o.type, GGUF_TYPES);
  }
  if (o.modelfile !== undefined) body.modelfile = expectBoolean("export option modelfile", o.modelfile);
  if (o.overwrite !== undefined) body.overwrite = expectBoolean("export option overwrite", o.overwrite);
  if (o.adapter !== undefined) body.adapters = checkAdapters(o.adapter, "export option adapter", cwd);
  return { body, quiet: o.quiet === undefined ? false : expectBoolean("export option quiet", o.quiet) };
}

function progressLine(label: string, event: ExportProgressEvent): string {
  const bytes = event.bytes_total > 0 && event.stage === "write" ? ` (${formatSize(event.bytes_done)} of ${formatSize(event.bytes_total)})` : "";
  return `[${label}] ${event.stage} ${Math.round(event.fraction * 100)}%${bytes}`;
}

/**
 * Turns export_progress events into a few lines, as load progress does: one when a stage starts
 * and one per quarter of a long stage. "done" is left to the report that follows.
 */
export function createExportProgress(label: string, write: (line: string) => void): (event: ExportProgressEvent) => void {
  let stage = "";
  let quarter = -1;
  return (event) => {
    if (event.stage === "done") return;
    const q = Math.floor(event.fraction * 4);
    if (event.stage === stage && q <= quarter) return;
    stage = event.stage;
    quarter = q;
    write(`${progressLine(label, event)}\n`);
  };
}

/** Reports one save or export: its progress, then the report table (or that it failed). */
export interface ExportReporter {
  progress(event: ExportProgressEvent): void;
  done(report: ExportReport): void;
  failed(): void;
}

/**
 * In a notebook, one progress line rewritten in place (throttled) that turns into the report's
 * table; in a terminal, a few progress lines and then the table's text.
 */
export function createExportReporter(label: string, sink: DisplaySink, options: ThrottleOptions = {}): ExportReporter {
  if (!sink.rich) {
    const progress = createExportProgress(label, (line) => sink.text(line));
    return { progress, done: (report) => sink.display(report.bundle()), failed: () => undefined };
  }
  const id = randomUUID();
  let shown = false;
  let last = "";
  const lines = createThrottle((line: string) => {
    sink.display({ data: { "text/plain": line } }, { id, update: shown });
    shown = true;
  }, options);
  return {
    progress(event) {
      if (event.stage === "done") return;
      last = progressLine(label, event);
      lines.push(last);
    },
    done(report) {
      lines.cancel();
      sink.display(report.bundle(), { id, update: shown });
    },
    failed() {
      if (shown) lines.finish(`${last} (failed)`);
      else lines.cancel();
    },
  };
}

/** Sends a save or export for `target`'s model, shows progress and the report, and resolves to the report. */
export async function runExport(
  target: ExportTarget,
  kind: "save" | "export",
  body: Body<SaveRequest> | Body<ExportRequest>,
  quiet: boolean,
): Promise<ExportReport> {
  const { client, modelId } = await target.connect();
  const base = target.sink();
  // Bound to the cell running now, so the table lands there even if it arrives after an interrupt.
  const reporter = quiet ? undefined : createExportReporter(`${kind} ${basename(body.target)}`, base.pin?.() ?? base);
  const onEvent = (event: { content: ExportProgressEvent }) => reporter?.progress(event.content);
  let reply;
  try {
    reply =
      kind === "save"
        ? await client.request("save", { ...(body as Body<SaveRequest>), model_id: modelId }, { onEvent })
        : await client.request("export", { ...(body as Body<ExportRequest>), model_id: modelId }, { onEvent });
  } catch (error) {
    reporter?.failed();
    throw error;
  }
  const report = ExportReport.fromWire(reply);
  reporter?.done(report);
  return report;
}
