import { afterEach, describe, expect, it } from "vitest";
import { GpuWidget, gpuRendererFactory } from "./gpu";
import { GPU_MIME } from "./mime";
import { gpu, render, text, words } from "./testutil";

const GiB = 1024 ** 3;
let widgets: GpuWidget[] = [];
async function show(bundle: unknown) {
  const w = new GpuWidget();
  widgets.push(w);
  return render(w, GPU_MIME, bundle);
}
afterEach(() => {
  widgets.forEach((w) => w.dispose());
  widgets = [];
});

function stats(card: Element): Record<string, string> {
  return Object.fromEntries([...card.querySelectorAll(".qwenbook-stat")].map((s) => [text(s.querySelector(".qwenbook-stat-label")), text(s.querySelector(".qwenbook-stat-value"))]));
}

describe("GPU gauge", () => {
  it("is registered as safe for the gpu MIME type", () => {
    expect(gpuRendererFactory.mimeTypes).toEqual([GPU_MIME]);
    expect(gpuRendererFactory.safe).toBe(true);
  });

  it("shows used, reserved, peak and total with the percentage used", async () => {
    const w = await show(gpu());
    const card = w.node.querySelector(".qwenbook-gauge")!;
    expect(card.getAttribute("data-device")).toBe("cuda:0");
    expect(words(card.querySelector(".qwenbook-gauge-title"))).toBe("cuda:0 NVIDIA H100 80GB HBM3");
    expect(stats(card)).toEqual({ used: "31.5 GiB", reserved: "40.0 GiB", peak: "48.0 GiB", total: "80.0 GiB" });
    expect(text(card.querySelector(".qwenbook-dial-label"))).toBe("39%");
    expect(text(card.querySelector(".qwenbook-dial-sublabel"))).toBe("of 80.0 GiB");
    expect(card.getAttribute("data-level")).toBe("ok");
  });

  it("draws the arcs in proportion to total", async () => {
    const w = await show(gpu());
    const used = w.node.querySelector(".qwenbook-dial-used")!.getAttribute("d")!;
    const reserved = w.node.querySelector(".qwenbook-dial-reserved")!.getAttribute("d")!;
    // Both arcs start at the left end; the used one ends further left than the reserved one.
    const endX = (d: string) => Number(d.trim().split(/\s+/).slice(-2)[0]);
    expect(used.startsWith("M 10.00 52.00")).toBe(true);
    expect(endX(used)).toBeLessThan(endX(reserved));
    expect(w.node.querySelector(".qwenbook-dial-peak")).not.toBeNull();
  });

  it("draws one sparkline point per history sample", async () => {
    const w = await show(gpu());
    const points = w.node.querySelector(".qwenbook-sparkline-line")!.getAttribute("points")!.split(" ");
    expect(points).toHaveLength(4);
    expect(text(w.node.querySelector(".qwenbook-sparkline title"))).toBe("used memory over 3.0 s");
  });

  it("draws one gauge per device", async () => {
    const base = gpu().devices[0];
    const w = await show(gpu({ devices: [base, { ...base, device: "cuda:1", used: 75 * GiB, reserved: 78 * GiB }] }));
    const cards = [...w.node.querySelectorAll(".qwenbook-gauge")];
    expect(cards.map((c) => c.getAttribute("data-device"))).toEqual(["cuda:0", "cuda:1"]);
    expect(cards[1].getAttribute("data-level")).toBe("full");
    expect(cards[1].querySelector(".qwenbook-dial-used")?.classList.contains("qwenbook-level-full")).toBe(true);
  });

  it("for a CPU-only worker shows process RAM and says so", async () => {
    const w = await show(gpu({ devices: [{ device: "cpu", kind: "cpu", used: 1.5 * GiB, total: 24 * GiB, history: [GiB, 1.5 * GiB] }] }));
    const card = w.node.querySelector(".qwenbook-gauge")!;
    expect(text(card.querySelector(".qwenbook-gauge-device"))).toBe("CPU");
    expect(stats(card)).toEqual({ "process RAM": "1.5 GiB", "machine RAM": "24.0 GiB" });
    expect(text(card.querySelector(".qwenbook-gauge-note"))).toBe("CPU only: no GPU is in use, so this shows the worker process's RAM.");
    expect(card.querySelector(".qwenbook-dial-reserved")).toBeNull();
  });

  it("labels a training rank's dial with the rank and its device", async () => {
    const rank = { device: "rank 1 · cpu", kind: "cpu", name: "process memory (RSS)", used: GiB, peak: GiB, total: 24 * GiB, history: [GiB] };
    const w = await show(gpu({ devices: [{ ...rank, device: "cpu" }, rank] }));
    const cards = [...w.node.querySelectorAll(".qwenbook-gauge")];
    expect(cards.map((c) => text(c.querySelector(".qwenbook-gauge-device")))).toEqual(["CPU", "rank 1 · cpu"]);
    expect(text(cards[1].querySelector(".qwenbook-gauge-note"))).toBe("A training rank on the CPU: this shows its process's RAM.");
  });

  it("lists each paged engine's cache under its device, with a bar of the blocks in use", async () => {
    const chat = {
      model_id: "tiny-qwen2", role: "chat" as const, device: "cuda:0", blocks_total: 4096, blocks_used: 1024, block_size: 16,
      cache_bytes: 48 * 1024 ** 2, prefix_hit_rate: 0.35, running: 1, waiting: 0,
    };
    const server = { ...chat, role: "server" as const, blocks_used: 0, cache_bytes: 60 * GiB, memory_utilization: 0.9, waiting: 2 };
    const elsewhere = { ...chat, device: "cuda:3" };
    const w = await show(gpu({ engines: [chat, server, elsewhere] }));
    const card = w.node.querySelector(".qwenbook-gauge")!;
    const rows = [...card.querySelectorAll(".qwenbook-engine")];
    expect(rows.map((r) => [r.getAttribute("data-role"), r.getAttribute("data-model")])).toEqual([["chat", "tiny-qwen2"], ["server", "tiny-qwen2"]]);
    expect(text(rows[0].querySelector(".qwenbook-engine-title"))).toBe("KV cache (chat, tiny-qwen2)");
    expect(text(rows[0].querySelector(".qwenbook-engine-facts"))).toBe("1,024 / 4,096 blocks · 48 MiB · prefix hits 35%");
    expect(text(rows[1].querySelector(".qwenbook-engine-facts"))).toBe("0 / 4,096 blocks · 60.0 GiB · prefix hits 35% · 2 waiting");
    expect(rows[0].querySelector(".qwenbook-engine-fill")!.getAttribute("style")).toBe("width: 25.00%");
    expect(rows[0].querySelector(".qwenbook-engine-track")!.getAttribute("aria-valuenow")).toBe("1024");
    // A cache on a device the sample does not list still shows, below the cards, naming its device.
    const outside = w.node.querySelector(".qwenbook-gpu-devices > .qwenbook-gauge-engines")!;
    expect(text(outside.querySelector(".qwenbook-engine-title"))).toBe("KV cache (chat, tiny-qwen2) on cuda:3");
  });

  it("draws no engine section without engines", async () => {
    const w = await show(gpu());
    expect(w.node.querySelector(".qwenbook-gauge-engines")).toBeNull();
  });

  it("says whether it is live", async () => {
    const w = await show(gpu());
    expect(text(w.node.querySelector(".qwenbook-gpu-footer"))).toMatch(/^live · \d\d:\d\d:\d\d$/);
    await render(w, GPU_MIME, gpu({ live: false }));
    expect(text(w.node.querySelector(".qwenbook-gpu-footer"))).toMatch(/^sampled at \d\d:\d\d:\d\d$/);
  });

  it("says when there are no devices instead of drawing nothing", async () => {
    const w = await show(gpu({ devices: [] }));
    expect(text(w.node.querySelector(".qwenbook-gpu-empty"))).toBe("The worker reported no devices.");
  });

  it("survives a zero total without dividing by it", async () => {
    const w = await show(gpu({ devices: [{ device: "cuda:0", kind: "cuda", used: 0, total: 0 }] }));
    expect(text(w.node.querySelector(".qwenbook-dial-label"))).toBe("–");
  });
});
