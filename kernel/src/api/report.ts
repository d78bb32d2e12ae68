import { inspect } from "node:util";
import type { ExportReply, FileSize, QualityInfo, QuantInfo as WireQuantInfo } from "../bridge/protocol.gen";
import type { DisplayBundle } from "../display/sink";
import type { QualityFigures, QuantInfo } from "./types";

/** One file a save or export wrote, with its size in bytes (path relative to the saved folder, or the file's name). */
export type ExportFile = FileSize;

/** What the writer did; which fields are present depends on the format. */
export interface ExportDetails {
  shards?: number;
  tensors?: number;
  /** An adapter was folded into the weights. */
  merged?: boolean;
  /** Adapter folders merged in. */
  adapters?: readonly string[];
  /** Linear layers stored quantized. */
  layers?: number;
  rounding?: string;
  /** The unquantized folder the weights were quantized again from. */
  requantizedFrom?: string;
  /** Weights held quantized were written back as floating point. */
  dequantized?: boolean;
  /** GGUF tensors kept in f16 because their rows do not split into whole quantization blocks. */
  keptF16?: readonly string[];
  /** GGUF tensor types used. */
  types?: readonly string[];
  /** GGUF K-quant mix: how many tensors of each type. */
  tensorTypes?: Readonly<Record<string, number>>;
  /** GGUF K-quant mix: tensors given another type than the mix's main one ("q6_k: output layer"). */
  otherTypes?: Readonly<Record<string, string>>;
  /** The Ollama Modelfile written beside the GGUF file (`ollama create NAME -f <it>`). */
  modelfile?: { readonly path: string; readonly template: string | null };
}

/** Sizes in powers of 1000, as the shard-size option and transformers count them. */
export function formatSize(bytes: number): string {
  const units: [string, number][] = [["TB", 1e12], ["GB", 1e9], ["MB", 1e6], ["kB", 1e3]];
  for (const [unit, div] of units) {
    if (bytes >= div) return `${(bytes / div).toFixed(bytes / div >= 100 ? 0 : 1)} ${unit}`;
  }
  return `${bytes} B`;
}

export function toQualityFigures(q: QualityInfo): QualityFigures {
  return {
    tokens: q.tokens,
    perplexity: q.perplexity,
    ...(q.reference_perplexity === undefined ? {} : { referencePerplexity: q.reference_perplexity }),
    ...(q.mean_kl === undefined ? {} : { meanKl: q.mean_kl }),
    ...(q.top1_agreement === undefined ? {} : { top1Agreement: q.top1_agreement }),
    text: q.text,
  };
}

export function toQuantInfo(q: WireQuantInfo): QuantInfo {
  return {
    method: q.method,
    ...(q.group_size === undefined ? {} : { groupSize: q.group_size }),
    rounding: q.rounding,
    layers: q.layers,
    quantizedBytes: q.quantized_bytes,
    bf16Bytes: q.bf16_bytes,
    fromFolder: q.from_folder,
    ...(q.quality === undefined ? {} : { quality: toQualityFigures(q.quality) }),
  };
}

function number(x: number): string {
  return Math.abs(x) >= 1e4 || (x !== 0 && Math.abs(x) < 1e-3) ? x.toExponential(3) : x.toPrecision(4);
}

/** "perplexity 12.3 (unquantized 11.9), mean KL 0.0123 nats, top-1 agreement 97.1%" */
export function qualityLine(q: QualityFigures): string {
  const parts = [`perplexity ${number(q.perplexity)}` + (q.referencePerplexity === undefined ? "" : ` (unquantized ${number(q.referencePerplexity)})`)];
  if (q.meanKl !== undefined) parts.push(`mean KL ${number(q.meanKl)} nats`);
  if (q.top1Agreement !== undefined) parts.push(`top-1 agreement ${(100 * q.top1Agreement).toFixed(1)}%`);
  return parts.join(", ");
}

/** The line printed under a quantized load: weight memory, and quality where it was measured. */
export function quantSummary(q: QuantInfo): string {
  const how = q.method === "int4" && q.groupSize !== undefined ? `int4 (group ${q.groupSize}, ${q.rounding})` : `${q.method} (${q.rounding})`;
  const memory = q.quantizedBytes > 0 ? `: ${q.layers} linear layers in ${formatSize(q.quantizedBytes)} (bf16: ${formatSize(q.bf16Bytes)})` : "";
  const quality = q.quality ? `; ${qualityLine(q.quality)} on ${q.quality.tokens} tokens of ${q.quality.text}` : "";
  return `${how}${memory}${quality}`;
}

function escapeHtml(s: string): string {
  return s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]!);
}

/**
 * What every save and export resolves to: where it went, the files and their sizes, and for
 * quantized forms how far they are from the unquantized model. Inspects as one line; `toString()`
 * is the full table.
 */
export class ExportReport {
  readonly path: string;
  /** "safetensors", "safetensors-int8", "safetensors-int4" or "gguf-<type>". */
  readonly format: string;
  readonly files: readonly ExportFile[];
  readonly totalBytes: number;
  /** Measured for quantized forms; null for plain and merged saves. */
  readonly quality: QualityFigures | null;
  readonly details: Readonly<ExportDetails>;

  constructor(fields: Pick<ExportReport, "path" | "format" | "files" | "totalBytes" | "quality" | "details">) {
    this.path = fields.path;
    this.format = fields.format;
    this.files = fields.files;
    this.totalBytes = fields.totalBytes;
    this.quality = fields.quality;
    this.details = fields.details;
  }

  static fromWire(reply: ExportReply): ExportReport {
    const d = reply.details;
    const details: ExportDetails = {};
    if (d.shards !== undefined) details.shards = d.shards;
    if (d.tensors !== undefined) details.tensors = d.tensors;
    if (d.merged !== undefined) details.merged = d.merged;
    if (d.adapters !== undefined) details.adapters = [...d.adapters];
    if (d.layers !== undefined) details.layers = d.layers;
    if (d.rounding !== undefined) details.rounding = d.rounding;
    if (d.requantized_from !== undefined) details.requantizedFrom = d.requantized_from;
    if (d.dequantized !== undefined) details.dequantized = d.dequantized;
    if (d.kept_f16 !== undefined) details.keptF16 = [...d.kept_f16];
    if (d.types !== undefined) details.types = [...d.types];
    if (d.tensor_types !== undefined) details.tensorTypes = { ...d.tensor_types };
    if (d.other_types !== undefined) details.otherTypes = { ...d.other_types };
    if (d.modelfile !== undefined) details.modelfile = { path: d.modelfile.path, template: d.modelfile.template ?? null };
    return new ExportReport({
      path: reply.path,
      format: reply.format,
      files: reply.sizes.files.map((f) => ({ path: f.path, bytes: f.bytes })),
      totalBytes: reply.sizes.total_bytes,
      quality: reply.quality ? toQualityFigures(reply.quality) : null,
      details,
    });
  }

  /** Notes worth a line under the table. */
  #notes(): string[] {
    const d = this.details;
    const notes: string[] = [];
    if (d.adapters?.length) notes.push(`merged adapter${d.adapters.length > 1 ? "s" : ""}: ${d.adapters.join(", ")}`);
    if (d.rounding) notes.push(`rounding: ${d.rounding}`);
    if (d.requantizedFrom) notes.push(`quantized again from the unquantized weights in ${d.requantizedFrom}`);
    if (d.dequantized) notes.push("the quantized weights were written back as floating point");
    if (d.keptF16?.length) notes.push(`kept in f16: ${d.keptF16.join(", ")}`);
    if (d.tensorTypes) notes.push(`tensor types: ${Object.entries(d.tensorTypes).map(([t, n]) => `${n} ${t}`).join(", ")}`);
    if (d.modelfile) notes.push(`Ollama: ollama create <name> -f ${d.modelfile.path}`);
    return notes;
  }

  toString(): string {
    const width = Math.max(5, ...this.files.map((f) => f.path.length));
    const row = (name: string, bytes: number) => `  ${name.padEnd(width)}  ${formatSize(bytes).padStart(8)}`;
    const lines = [`${this.format} → ${this.path}`, ...this.files.map((f) => row(f.path, f.bytes))];
    lines.push(row(`total (${this.files.length} file${this.files.length === 1 ? "" : "s"})`, this.totalBytes));
    for (const note of this.#notes()) lines.push(note);
    const q = this.quality;
    if (q) lines.push(`quality on ${q.tokens} tokens of ${q.text}:`, `  ${qualityLine(q)}`);
    return lines.join("\n");
  }

  /** The report as a notebook output: a small table, with this text for plain-text frontends. */
  bundle(): DisplayBundle {
    const cell = 'style="text-align:right;padding:0 0.6em"';
    const rows = this.files.map((f) => `<tr><td><code>${escapeHtml(f.path)}</code></td><td ${cell}>${formatSize(f.bytes)}</td></tr>`);
    rows.push(`<tr><td><b>total</b> (${this.files.length} file${this.files.length === 1 ? "" : "s"})</td><td ${cell}><b>${formatSize(this.totalBytes)}</b></td></tr>`);
    let html = `<div class="qwenbook-export"><div><b>${escapeHtml(this.format)}</b> → <code>${escapeHtml(this.path)}</code></div>`;
    html += `<table>${rows.join("")}</table>`;
    const q = this.quality;
    if (q) {
      const qrows: [string, string][] = [["perplexity", number(q.perplexity)]];
      if (q.referencePerplexity !== undefined) qrows.push(["unquantized perplexity", number(q.referencePerplexity)]);
      if (q.meanKl !== undefined) qrows.push(["mean KL (nats)", number(q.meanKl)]);
      if (q.top1Agreement !== undefined) qrows.push(["top-1 agreement", `${(100 * q.top1Agreement).toFixed(1)}%`]);
      html += `<table><caption style="text-align:left">quality on ${q.tokens} tokens of ${escapeHtml(q.text)}</caption>`;
      html += qrows.map(([k, v]) => `<tr><td>${k}</td><td ${cell}>${v}</td></tr>`).join("") + "</table>";
    }
    const notes = this.#notes();
    if (notes.length) html += `<div>${notes.map(escapeHtml).join("<br>")}</div>`;
    return { data: { "text/plain": this.toString(), "text/html": html + "</div>" } };
  }

  toJSON(): Record<string, unknown> {
    const { path, format, files, totalBytes, quality, details } = this;
    return { path, format, files, totalBytes, quality, details };
  }
}

// Defined outside the class body so the public .d.ts does not depend on Node's util types.
Object.defineProperty(ExportReport.prototype, inspect.custom, {
  value(this: ExportReport): string {
    const n = this.files.length;
    const head = `ExportReport(${this.format}, ${n} file${n === 1 ? "" : "s"}, ${formatSize(this.totalBytes)}, ${this.path}`;
    return this.quality ? `${head}; ${qualityLine(this.quality)})` : `${head})`;
  },
});
