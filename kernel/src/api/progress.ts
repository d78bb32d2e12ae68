import { randomUUID } from "node:crypto";
import type { LoadProgressEvent } from "../bridge/protocol.gen";
import type { DisplaySink } from "../display/sink";
import { createThrottle, type ThrottleOptions } from "../display/throttle";

/** Reports one model load to the user: its progress events, then a summary line or a failure. */
export interface LoadReporter {
  progress(event: LoadProgressEvent): void;
  /** The load is over; `summary` says what was loaded. */
  done(summary: string): void;
  /** The load failed; the error itself is reported by whoever awaited it. */
  failed(): void;
}

/**
 * In a notebook, one output line rewritten in place (throttled) that ends as the summary; in a
 * terminal, a few lines as {@link createLoadProgress} prints them, then the summary.
 */
export function createLoadReporter(label: string, sink: DisplaySink, options: ThrottleOptions = {}): LoadReporter {
  if (!sink.rich) {
    const progress = createLoadProgress(label, (line) => sink.text(line));
    return { progress, done: (summary) => sink.text(`${summary}\n`), failed: () => undefined };
  }
  const id = randomUUID();
  let shown = false;
  let last = "";
  const show = (line: string) => {
    sink.display({ data: { "text/plain": line } }, { id, update: shown });
    shown = true;
  };
  const lines = createThrottle(show, options);
  return {
    progress(event) {
      if (event.stage === "ready") return;
      last = progressLine(label, event);
      lines.push(last);
    },
    done(summary) {
      if (shown) lines.finish(summary);
      else sink.text(`${summary}\n`);
    },
    failed() {
      if (shown) lines.finish(`${last} (failed)`);
      else lines.cancel();
    },
  };
}

/**
 * Turns load_progress events into a few plain-text lines: one per stage, plus one per quarter of
 * a long stage (a 15 GB download), so a cell shows progress without thousands of lines. The
 * "ready" stage is left to the caller's summary line.
 */
export function createLoadProgress(label: string, write: (line: string) => void): (event: LoadProgressEvent) => void {
  let stage = "";
  let quarter = -1;
  return (event) => {
    // The caller prints its own one-line summary when the load is done.
    if (event.stage === "ready") return;
    const q = event.fraction === undefined ? -1 : Math.floor(event.fraction * 4);
    if (event.stage === stage && q <= quarter) return;
    if (event.stage !== stage) quarter = -1;
    stage = event.stage;
    quarter = q;
    write(`${progressLine(label, event)}\n`);
  };
}

function progressLine(label: string, event: LoadProgressEvent): string {
  const pct = event.fraction === undefined ? "" : ` ${Math.round(event.fraction * 100)}%`;
  const bytes =
    event.bytes_total !== undefined && event.bytes_done !== undefined
      ? ` (${formatBytes(event.bytes_done)} of ${formatBytes(event.bytes_total)})`
      : "";
  return `[${label}] ${event.stage}${pct}: ${event.message}${bytes}`;
}

export function formatBytes(n: number): string {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}
