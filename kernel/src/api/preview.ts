import { inspect } from "node:util";
import type { PreviewExample as WireExample } from "../bridge/protocol.gen";

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

/** What `run.preview(n)` shows and returns: the first examples rendered through the chat template. */
export class TrainPreview {
  readonly examples: readonly PreviewExample[];

  constructor(examples: readonly WireExample[]) {
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
    const parts = this.examples.map((e, i) => {
      const body = e.segments.map((s) => (s.trained ? `${OPEN}${s.text}${CLOSE}` : s.text)).join("");
      return `── ${heading(e, i)} ──\n${body.replace(/\n+$/, "")}`;
    });
    return [...parts, LEGEND].join("\n\n");
  }

  /** HTML for notebooks: masked text dimmed, trained text highlighted. */
  html(): string {
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
    return `TrainPreview(${this.examples.length} example${this.examples.length === 1 ? "" : "s"})`;
  }
}

Object.defineProperty(TrainPreview.prototype, inspect.custom, {
  value(this: TrainPreview): string {
    return this.toString();
  },
});

function heading(e: PreviewExample, i: number): string {
  const cut = e.truncated ? ", truncated to maxLength" : "";
  return `example ${i + 1} · ${e.source} row ${e.row} · ${e.tokens} tokens, ${e.trainedTokens} trained${cut}`;
}

function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]!);
}
