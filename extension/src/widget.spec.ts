import { afterEach, describe, expect, it } from "vitest";
import { ChatWidget } from "./chat";
import { GpuWidget } from "./gpu";
import { CHAT_MIME, GPU_MIME, TRAIN_MIME } from "./mime";
import { chat, gpu, render, text, train } from "./testutil";
import { TrainWidget } from "./train";

let widgets: Array<{ dispose(): void }> = [];
afterEach(() => {
  widgets.forEach((w) => w.dispose());
  widgets = [];
});

describe("every renderer, given a bad bundle", () => {
  const cases = [
    { name: "chat", make: () => new ChatWidget(), mime: CHAT_MIME, label: "chat" },
    { name: "train", make: () => new TrainWidget({ draw: async () => {}, resize() {}, purge() {} }), mime: TRAIN_MIME, label: "training dashboard" },
    { name: "gpu", make: () => new GpuWidget(), mime: GPU_MIME, label: "GPU memory gauge" },
  ];

  for (const c of cases) {
    it(`${c.name}: shows an error box with the plain-text output instead of a blank output`, async () => {
      const w = c.make();
      widgets.push(w);
      await render(w, c.mime, { version: 1, devices: "x", messages: 5 }, "the text/plain form");
      const box = w.node.querySelector(".qwenbook-error")!;
      expect(box.getAttribute("role")).toBe("alert");
      expect(text(box.querySelector(".qwenbook-error-title"))).toBe(`This ${c.label} output is malformed`);
      expect(text(box.querySelector(".qwenbook-error-detail"))).not.toBe("");
      expect(text(box.querySelector(".qwenbook-error-fallback pre"))).toBe("the text/plain form");
      expect(w.node.querySelector(".qwenbook-body")?.hasAttribute("hidden")).toBe(true);
    });

    it(`${c.name}: shows a newer-version box`, async () => {
      const w = c.make();
      widgets.push(w);
      await render(w, c.mime, { version: 7 });
      expect(text(w.node.querySelector(".qwenbook-error-title"))).toMatch(/was written by a newer Qwenbook$/);
    });
  }

  it("recovers when a later update is good", async () => {
    const w = new GpuWidget();
    widgets.push(w);
    await render(w, GPU_MIME, { version: 1 });
    expect(w.node.querySelector(".qwenbook-error")).not.toBeNull();
    await render(w, GPU_MIME, gpu());
    expect(w.node.querySelector(".qwenbook-error")).toBeNull();
    expect(w.node.querySelector(".qwenbook-body")?.hasAttribute("hidden")).toBe(false);
    expect(w.node.querySelectorAll(".qwenbook-gauge")).toHaveLength(1);
  });

  it("turns a crash while drawing into an error box", async () => {
    class Broken extends ChatWidget {
      protected override draw(): void {
        throw new Error("cannot read properties of undefined");
      }
    }
    const w = new Broken();
    widgets.push(w);
    await render(w, CHAT_MIME, chat(), "user: hi");
    expect(text(w.node.querySelector(".qwenbook-error-title"))).toBe("The chat could not be drawn");
    expect(text(w.node.querySelector(".qwenbook-error-detail"))).toBe("cannot read properties of undefined");
    expect(text(w.node.querySelector(".qwenbook-error-fallback pre"))).toBe("user: hi");
  });

  it("draws good bundles of each kind without an error box", async () => {
    for (const [w, mime, bundle] of [
      [new ChatWidget(), CHAT_MIME, chat()],
      [new TrainWidget({ draw: async () => {}, resize() {}, purge() {} }), TRAIN_MIME, train()],
      [new GpuWidget(), GPU_MIME, gpu()],
    ] as const) {
      widgets.push(w);
      await render(w, mime, bundle);
      expect(w.node.querySelector(".qwenbook-error")).toBeNull();
    }
  });
});
