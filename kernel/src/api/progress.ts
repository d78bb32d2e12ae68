import type { LoadProgressEvent } from "../bridge/protocol.gen";

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
    const pct = event.fraction === undefined ? "" : ` ${Math.round(event.fraction * 100)}%`;
    const bytes =
      event.bytes_total !== undefined && event.bytes_done !== undefined
        ? ` (${formatBytes(event.bytes_done)} of ${formatBytes(event.bytes_total)})`
        : "";
    write(`[${label}] ${event.stage}${pct}: ${event.message}${bytes}\n`);
  };
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
