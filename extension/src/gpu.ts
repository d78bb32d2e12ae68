import type { IRenderMime } from "@jupyterlab/rendermime-interfaces";
import type { DeviceGauge, GpuBundle } from "./bundles.gen";
import { h, replaceChildren } from "./dom";
import { formatBytes, formatDuration } from "./format";
import { dial, sparkline } from "./gauge";
import { GPU_MIME } from "./mime";
import { BundleWidget } from "./widget";

/** Memory pressure where an out-of-memory error gets likely; what counts is what the allocator holds. */
const HIGH = 0.8;
const FULL = 0.95;

/** One dial per device; a CPU-only worker gets one dial for its process RAM, labelled as such. */
export class GpuWidget extends BundleWidget<typeof GPU_MIME> {
  private readonly root = h("div", { class: "qwenbook-gpu" });
  private readonly devices = h("div", { class: "qwenbook-gpu-devices" });
  private readonly footer = h("div", { class: "qwenbook-gpu-footer" });

  constructor() {
    super(GPU_MIME);
    this.root.append(this.devices, this.footer);
    this.body.append(this.root);
  }

  protected draw(bundle: GpuBundle): void {
    this.root.dataset.live = String(bundle.live === true);
    replaceChildren(
      this.devices,
      ...(bundle.devices.length > 0
        ? bundle.devices.map((d) => deviceCard(d, bundle.intervalS))
        : [h("div", { class: "qwenbook-gpu-empty" }, "The worker reported no devices.")]),
    );
    const when = bundle.time !== undefined ? clockTime(bundle.time) : undefined;
    replaceChildren(
      this.footer,
      bundle.live ? h("span", { class: "qwenbook-live-dot", "aria-hidden": "true" }) : null,
      bundle.live ? `live${when ? ` · ${when}` : ""}` : when ? `sampled at ${when}` : "",
    );
  }
}

function deviceCard(d: DeviceGauge, intervalS: number | undefined): HTMLElement {
  const total = d.total;
  const frac = (v: number | undefined) => (v !== undefined && total > 0 ? v / total : undefined);
  const held = Math.max(d.used, d.reserved ?? 0);
  const pressure = total > 0 ? held / total : 0;
  const level = pressure >= FULL ? "full" : pressure >= HIGH ? "high" : "ok";
  const percent = total > 0 ? `${Math.round((d.used / total) * 100)}%` : "–";
  const stat = (key: string, label: string, value: number | undefined) =>
    value === undefined
      ? null
      : h(
          "div",
          { class: `qwenbook-stat qwenbook-stat-${key}` },
          h("span", { class: "qwenbook-stat-label" }, label),
          h("span", { class: "qwenbook-stat-value" }, formatBytes(value)),
        );
  const cpu = d.kind === "cpu";
  const history = d.history ?? [];
  const span = intervalS !== undefined && history.length > 1 ? ` over ${formatDuration(intervalS * (history.length - 1))}` : "";
  return h(
    "div",
    { class: "qwenbook-gauge", "data-device": d.device, "data-kind": d.kind, "data-level": level },
    h(
      "div",
      { class: "qwenbook-gauge-title" },
      h("span", { class: "qwenbook-gauge-device" }, d.device === "cpu" ? "CPU" : d.device),
      d.name ? h("span", { class: "qwenbook-gauge-name" }, d.name) : null,
    ),
    dial({
      used: frac(d.used) ?? 0,
      reserved: frac(d.reserved),
      peak: frac(d.peak),
      label: percent,
      sublabel: `of ${formatBytes(total)}`,
      level,
    }),
    // Not a <dl>: JupyterLab styles definition lists inside outputs as floated columns.
    h(
      "div",
      { class: "qwenbook-gauge-stats" },
      stat("used", cpu ? "process RAM" : "used", d.used),
      stat("reserved", "reserved", d.reserved),
      stat("peak", "peak", d.peak),
      stat("total", cpu ? "machine RAM" : "total", total),
    ),
    sparkline(history, `${cpu ? "process RAM" : "used memory"}${span}`),
    cpu
      ? h(
          "div",
          { class: "qwenbook-gauge-note" },
          d.device === "cpu"
            ? "CPU only: no GPU is in use, so this shows the worker process's RAM."
            : "A training rank on the CPU: this shows its process's RAM.",
        )
      : null,
  );
}

function clockTime(unixSeconds: number): string {
  const d = new Date(unixSeconds * 1000);
  const pad = (n: number) => String(n).padStart(2, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export const gpuRendererFactory: IRenderMime.IRendererFactory = {
  safe: true,
  mimeTypes: [GPU_MIME],
  defaultRank: 10,
  createRenderer: () => new GpuWidget(),
};
