import { inspect } from "node:util";
import type { PreviewAnswer as WireAnswer, PreviewExample as WireExample, PreviewPair as WirePair } from "../bridge/protocol.gen";

/** One rendered training example, as the loss sees it. */
export interface PreviewExample {
  /** The dataset it came from and its 1-based row (the line, for JSONL). */
  source: string;
  row: number;
  tokens: number;
  /** Tokens the loss is computed on: the answers and their end-of-turn marker. */
  trainedTokens: number;
  /** Longer than maxLength, so cut there. */
  truncated: boolean;
  /** The chat-formatted text in consecutive pieces; `trained: false` pieces are masked (-100). */
  segments: Array<{ text: string; trained: boolean }>;
}

const OPEN = "⟦";
const CLOSE = "⟧";
const LEGEND = `${OPEN}…${CLOSE} marks what the loss is computed on (the answers); everything else is masked (-100)`;

/**
 * What `run.preview(n)` shows and returns: the first examples rendered through the chat template, or for a
 * preference run the first pairs (`pairs`, each answer after the shared prompt; `examples` is then empty).
 */
export class TrainPreview {
  readonly examples: readonly PreviewExample[];
  readonly pairs: readonly PreviewPair[];

  constructor(examples: readonly WireExample[], pairs: readonly WirePair[] = []) {
    const answer = (a: WireAnswer): PreviewAnswer => ({
      tokens: a.tokens,
      trainedTokens: a.trained_tokens,
      truncated: a.truncated,
      segments: a.segments.map((s) => ({ ...s })),
    });
    this.pairs = Object.freeze(pairs.map((p) => ({ source: p.source, row: p.row, chosen: answer(p.chosen), rejected: answer(p.rejected) })));
    this.examples = Object.freeze(
      examples.map((e) => ({
        source: e.source,
        row: e.row,
        tokens: e.tokens,
        trainedTokens: e.trained_tokens,
        truncated: e.truncated,
        segments: e.segments.map((s) => ({ ...s })),
      })),
    );
  }

  /** Plain text, with the trained spans between ⟦ and ⟧. */
  text(): string {
    if (this.pairs.length > 0) return pairsText(this.pairs);
    const parts = this.examples.map((e, i) => {
      const body = e.segments.map((s) => (s.trained ? `${OPEN}${s.text}${CLOSE}` : s.text)).join("");
      return `── ${heading(e, i)} ──\n${body.replace(/\n+$/, "")}`;
    });
    return [...parts, LEGEND].join("\n\n");
  }

  /** HTML for notebooks: masked text dimmed, trained text highlighted (a pair's two answers side by side). */
  html(): string {
    if (this.pairs.length > 0) return pairsHtml(this.pairs);
    const blocks = this.examples.map((e, i) => {
      const spans = e.segments
        .map((s) =>
          s.trained
            ? `<span style="background:rgba(56,142,60,.22);border-radius:2px" title="trained">${escapeHtml(s.text)}</span>`
            : `<span style="opacity:.55" title="masked (-100)">${escapeHtml(s.text)}</span>`,
        )
        .join("");
      return (
        `<div style="margin:6px 0"><div style="font-weight:600;font-size:smaller">${escapeHtml(heading(e, i))}</div>` +
        `<pre style="white-space:pre-wrap;margin:2px 0;padding:6px;border:1px solid rgba(128,128,128,.3)">${spans}</pre></div>`
      );
    });
    const legend =
      '<div style="font-size:smaller;opacity:.8"><span style="background:rgba(56,142,60,.22)">highlighted</span>: ' +
      "what the loss is computed on (the answers); dimmed: masked (-100)</div>";
    return `<div>${blocks.join("")}${legend}</div>`;
  }

  toString(): string {
    if (this.pairs.length > 0) return `TrainPreview(${this.pairs.length} pair${this.pairs.length === 1 ? "" : "s"})`;
    return `TrainPreview(${this.examples.length} example${this.examples.length === 1 ? "" : "s"})`;
  }
}

Object.defineProperty(TrainPreview.prototype, inspect.custom, {
  value(this: TrainPreview): string {
    return this.toString();
  },
});

/** One answer of a preference pair as the loss sees it: the shared prompt, then the scored answer. */
export interface PreviewAnswer {
  tokens: number;
  /** The answer's scored tokens (and its end-of-turn marker). */
  trainedTokens: number;
  truncated: boolean;
  segments: Array<{ text: string; trained: boolean }>;
}

export interface PreviewPair {
  source: string;
  row: number;
  chosen: PreviewAnswer;
  rejected: PreviewAnswer;
}

const PAIR_LEGEND = `${OPEN}…${CLOSE} marks the answer each loss term scores; the prompt (and any earlier turns) is masked`;

function pairsText(pairs: readonly PreviewPair[]): string {
  const body = (a: PreviewAnswer) => a.segments.map((s) => (s.trained ? `${OPEN}${s.text}${CLOSE}` : s.text)).join("").replace(/\n+$/, "");
  const parts = pairs.map(
    (p, i) => `── pair ${i + 1} · ${p.source} row ${p.row} ──\n[chosen · ${answerNote(p.chosen)}]\n${body(p.chosen)}\n[rejected · ${answerNote(p.rejected)}]\n${body(p.rejected)}`,
  );
  return [...parts, PAIR_LEGEND].join("\n\n");
}

/** The two answers side by side, prompt dimmed, scored answer highlighted (green chosen, red rejected). */
function pairsHtml(pairs: readonly PreviewPair[]): string {
  const column = (a: PreviewAnswer, label: string, color: string) => {
    const spans = a.segments
      .map((s) => (s.trained ? `<span style="background:${color};border-radius:2px" title="scored">${escapeHtml(s.text)}</span>` : `<span style="opacity:.55" title="masked (-100)">${escapeHtml(s.text)}</span>`))
      .join("");
    return (
      `<div style="flex:1;min-width:0"><div style="font-size:smaller;font-weight:600">${label} · ${escapeHtml(answerNote(a))}</div>` +
      `<pre style="white-space:pre-wrap;margin:2px 0;padding:6px;border:1px solid rgba(128,128,128,.3)">${spans}</pre></div>`
    );
  };
  const blocks = pairs.map(
    (p, i) =>
      `<div style="margin:6px 0"><div style="font-weight:600;font-size:smaller">pair ${i + 1} · ${escapeHtml(p.source)} row ${p.row}</div>` +
      `<div style="display:flex;gap:8px">${column(p.chosen, "chosen", "rgba(56,142,60,.22)")}${column(p.rejected, "rejected", "rgba(211,47,47,.18)")}</div></div>`,
  );
  const legend = '<div style="font-size:smaller;opacity:.8">highlighted: the answer each loss term scores; dimmed: the shared prompt, masked (-100)</div>';
  return `<div>${blocks.join("")}${legend}</div>`;
}

function answerNote(a: PreviewAnswer): string {
  return `${a.tokens} tokens, ${a.trainedTokens} scored${a.truncated ? ", truncated to maxLength" : ""}`;
}

function heading(e: PreviewExample, i: number): string {
  const cut = e.truncated ? ", truncated to maxLength" : "";
  return `example ${i + 1} · ${e.source} row ${e.row} · ${e.tokens} tokens, ${e.trainedTokens} trained${cut}`;
}

function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]!);
}
