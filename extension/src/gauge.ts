import { s } from "./dom";

// A half-circle dial drawn in a 100 x 60 box: the arc runs from the left end (0) to the right end (1).
const CX = 50;
const CY = 52;
const R = 40;

function point(fraction: number): [number, number] {
  const angle = Math.PI * (1 - clamp01(fraction));
  return [CX + R * Math.cos(angle), CY - R * Math.sin(angle)];
}

function arcPath(from: number, to: number): string {
  const [x0, y0] = point(from);
  const [x1, y1] = point(to);
  return `M ${x0.toFixed(2)} ${y0.toFixed(2)} A ${R} ${R} 0 0 1 ${x1.toFixed(2)} ${y1.toFixed(2)}`;
}

export function clamp01(x: number): number {
  return Number.isFinite(x) ? Math.min(1, Math.max(0, x)) : 0;
}

export interface DialValues {
  used: number;
  reserved?: number;
  peak?: number;
  /** Shown large in the middle, e.g. "41%". */
  label: string;
  /** Shown small under the label, e.g. "of 80 GiB". */
  sublabel?: string;
  /** Colour level of the used arc. */
  level: "ok" | "high" | "full";
}

/** The dial: track, reserved arc behind the used arc, a tick at the peak; all as fractions of total. */
export function dial({ used, reserved, peak, label, sublabel, level }: DialValues): SVGSVGElement {
  const arc = (cls: string, to: number) =>
    to > 0.001 ? s("path", { class: cls, d: arcPath(0, Math.max(to, 0.004)) }) : null;
  let tick: SVGElement | null = null;
  if (peak !== undefined && peak > 0) {
    const angle = Math.PI * (1 - clamp01(peak));
    const inner = [CX + (R - 8) * Math.cos(angle), CY - (R - 8) * Math.sin(angle)];
    const outer = [CX + (R + 8) * Math.cos(angle), CY - (R + 8) * Math.sin(angle)];
    tick = s("line", {
      class: "qwenbook-dial-peak",
      x1: inner[0].toFixed(2),
      y1: inner[1].toFixed(2),
      x2: outer[0].toFixed(2),
      y2: outer[1].toFixed(2),
    });
  }
  return s(
    "svg",
    { class: "qwenbook-dial", viewBox: "0 0 100 60", role: "img", "aria-label": `${label} used` },
    s("path", { class: "qwenbook-dial-track", d: arcPath(0, 1) }),
    reserved !== undefined ? arc("qwenbook-dial-reserved", clamp01(reserved)) : null,
    arc(`qwenbook-dial-used qwenbook-level-${level}`, clamp01(used)),
    tick,
    s("text", { class: "qwenbook-dial-label", x: CX, y: CY - 10, "text-anchor": "middle" }, label),
    sublabel ? s("text", { class: "qwenbook-dial-sublabel", x: CX, y: CY + 1, "text-anchor": "middle" }, sublabel) : null,
  );
}

/**
 * A small line of recent values with the area under it lightly filled. It is scaled to its own
 * largest value (the dial already shows the share of the total), so a trend stays visible when
 * memory use is a small part of the device.
 */
export function sparkline(values: readonly number[], title: string): SVGSVGElement | null {
  const max = Math.max(...values) * 1.15;
  if (values.length < 2 || !(max > 0)) return null;
  const w = 120;
  const hgt = 28;
  const pts = values.map((v, i) => {
    const x = (i / (values.length - 1)) * w;
    const y = hgt - 1 - clamp01(v / max) * (hgt - 2);
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  return s(
    "svg",
    { class: "qwenbook-sparkline", viewBox: `0 0 ${w} ${hgt}`, preserveAspectRatio: "none", role: "img", "aria-label": title },
    s("title", {}, title),
    s("polygon", { class: "qwenbook-sparkline-area", points: `0,${hgt} ${pts.join(" ")} ${w},${hgt}` }),
    s("polyline", { class: "qwenbook-sparkline-line", points: pts.join(" ") }),
  );
}
