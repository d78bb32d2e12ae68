import type { IRenderMime } from "@jupyterlab/rendermime-interfaces";
import type { DeviceGauge, EngineCache, GpuBundle } from "./bundles.gen";
import { h, replaceChildren } from "./dom";
import { formatBytes, formatDuration, formatInt } from "./format";
import { dial, sparkline } from "./gauge";
import { GPU_MIME } from "./mime";
import { BundleWidget } from "./widget";

/** Memory pressure where an out-of-memory error gets likely; what counts is what the allocator holds. */
const HIGH = 0.8;
const FULL = 0.95;

/**
 * One dial per device; a CPU-only worker gets one dial for its process RAM, labelled as such. Under a
 * device's figures, the key/value cache of each paged engine (chat, server) that lives on it.
 */
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
    const engines = bundle.engines ?? [];
    const listed = new Set(bundle.devices.map((d) => d.device));
    // A cache on a device the sample does not list (it should not happen) is still shown, below the cards.
    const elsewhere = engines.filter((e) => !listed.has(e.device));
    replaceChildren(
      this.devices,
      ...(bundle.devices.length > 0
        ? bundle.devices.map((d) => deviceCard(d, bundle.intervalS, engines.filter((e) => e.device === d.device)))
        : [h("div", { class: "qwenbook-gpu-empty" }, "The worker reported no devices.")]),
      elsewhere.length > 0 ? engineList(elsewhere, true) : null,
    );
    const when = bundle.time !== undefined ? clockTime(bundle.time) : undefined;
    replaceChildren(
      this.footer,
      bundle.live ? h("span", { class: "qwenbook-live-dot", "aria-hidden": "true" }) : null,
      bundle.live ? `live${when ? ` · ${when}` : ""}` : when ? `sampled at ${when}` : "",
    );
  }
}

function deviceCard(d: DeviceGauge, intervalS: number | undefined, engines: readonly EngineCache[]): HTMLElement {
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
    engines.length > 0 ? engineList(engines, false) : null,
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

/** One row per engine: whose cache, a bar of the blocks in use, and its size and prefix hits. */
function engineList(engines: readonly EngineCache[], withDevice: boolean): HTMLElement {
  return h(
    "div",
    { class: "qwenbook-gauge-engines" },
    ...engines.map((e) => {
      const used = e.blocks_total > 0 ? e.blocks_used / e.blocks_total : 0;
      const facts = [
        `${formatInt(e.blocks_used)} / ${formatInt(e.blocks_total)} blocks`,
        formatBytes(e.cache_bytes),
        `prefix hits ${Math.round(e.prefix_hit_rate * 100)}%`,
      ];
      if (e.waiting > 0) facts.push(`${e.waiting} waiting`);
      return h(
        "div",
        { class: "qwenbook-engine", "data-role": e.role, "data-model": e.model_id, "data-device": e.device },
        h("div", { class: "qwenbook-engine-title" }, `KV cache (${e.role}, ${e.model_id})${withDevice ? ` on ${e.device}` : ""}`),
        h(
          "div",
          {
            class: "qwenbook-engine-track",
            role: "progressbar",
            "aria-label": "cache blocks in use",
            "aria-valuemin": 0,
            "aria-valuemax": e.blocks_total,
            "aria-valuenow": e.blocks_used,
          },
          h("div", { class: "qwenbook-engine-fill", style: `width: ${(used * 100).toFixed(2)}%` }),
        ),
        h("div", { class: "qwenbook-engine-facts" }, facts.join(" · ")),
      );
    }),
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
