// Number formatting shared by the renderers. Locale-independent on purpose: the same notebook
// should read the same on every machine, and tests compare exact strings.

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

/** Bytes in binary units: "1.5 GiB", "312 MiB", "900 B". */
export function formatBytes(bytes: number): string {
  if (!Number.isFinite(bytes)) return "–";
  if (bytes >= GiB) return `${(bytes / GiB).toFixed(bytes >= 100 * GiB ? 0 : 1)} GiB`;
  if (bytes >= MiB) return `${Math.round(bytes / MiB)} MiB`;
  if (bytes >= 1024) return `${Math.round(bytes / 1024)} KiB`;
  return `${Math.round(bytes)} B`;
}

/** Seconds as "45 s", "3m 05s", "2h 10m". */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return "–";
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const total = Math.round(seconds);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  if (h > 0) return `${h}h ${String(m).padStart(2, "0")}m`;
  return `${m}m ${String(s).padStart(2, "0")}s`;
}

/** Milliseconds: "85 ms" below a second, else seconds. */
export function formatMs(ms: number): string {
  if (!Number.isFinite(ms)) return "–";
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

/** An integer with thousands separators: 12,345. */
export function formatInt(n: number): string {
  return Math.round(n)
    .toString()
    .replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

/** A rate with one decimal below 100 and none above: "42.7", "5,819". */
export function formatRate(n: number): string {
  return n < 100 ? n.toFixed(1) : formatInt(n);
}

/** A loss value with four significant digits. */
export function formatLoss(n: number | null | undefined): string {
  return n === null || n === undefined || !Number.isFinite(n) ? "–" : n.toPrecision(4);
}

/** A learning rate in short scientific notation: 2.0e-4. */
export function formatLr(n: number | undefined): string {
  return n === undefined || !Number.isFinite(n) ? "–" : n === 0 ? "0" : n.toExponential(1);
}

/** Any config value as a short string. */
export function formatValue(v: string | number | boolean | null | undefined): string {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number" && !Number.isInteger(v) && Math.abs(v) < 1e-3) return v.toExponential(1);
  return String(v);
}
