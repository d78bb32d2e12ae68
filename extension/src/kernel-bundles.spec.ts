// The kernel's builders and these renderers meet only through the saved bundle; this checks that
// what the kernel writes is what the renderers draw.
import { afterEach, describe, expect, it } from "vitest";
import { GpuHistory, TrainRecorder, chatBundle } from "../../kernel/src/display/bundles";
import { ChatWidget } from "./chat";
import { GpuWidget } from "./gpu";
import { CHAT_MIME, GPU_MIME, TRAIN_MIME } from "./mime";
import { mimeModel, text } from "./testutil";
import type { Figure } from "./train-figure";
import { TrainWidget } from "./train";
import { Widget } from "@lumino/widgets";

let widgets: Widget[] = [];
afterEach(() => {
  widgets.forEach((w) => w.dispose());
  widgets = [];
});

function attach<W extends Widget>(w: W): W {
  widgets.push(w);
  Widget.attach(w, document.body);
  return w;
}

describe("kernel builders rendered by the extension", () => {
  it("chat", async () => {
    const b = chatBundle({
      state: "done",
      messages: [{ role: "user", content: "你好" }, { role: "assistant", content: "你好！" }],
      stats: { completionTokens: 3, tokensPerSecond: 12.5, ttftMs: 40 },
    });
    const w = attach(new ChatWidget());
    await w.renderModel(mimeModel(b.data));
    expect(w.node.querySelector(".qwenbook-error")).toBeNull();
    expect(text(w.node.querySelector(".qwenbook-chat-tokens"))).toBe("3 tokens");
  });

  it("train, through TrainRecorder", async () => {
    const rec = new TrainRecorder({ totalSteps: 50, config: { r: 8 } });
    for (let s = 1; s <= 50; s++) rec.step({ step: s, loss: 3 / s, lr: 1e-4 });
    rec.evaluate(50, 0.2).finish("done");
    const figures: Figure[] = [];
    const w = attach(new TrainWidget({ draw: async (_el, f) => void figures.push(f), resize() {}, purge() {} }));
    await w.renderModel(mimeModel(rec.bundle().data));
    expect(w.node.querySelector(".qwenbook-error")).toBeNull();
    expect((figures[0].data[0] as { x: number[] }).x).toHaveLength(50);
    expect(rec.bundle().data[TRAIN_MIME].state).toBe("done");
  });

  it("gpu, through GpuHistory", async () => {
    const h = new GpuHistory();
    h.push({ devices: [{ device: "cpu", kind: "cpu", used: 2 ** 30, total: 2 ** 34 }], time: 1 });
    h.push({ devices: [{ device: "cpu", kind: "cpu", used: 2 ** 31, total: 2 ** 34 }], time: 2 });
    const w = attach(new GpuWidget());
    await w.renderModel(mimeModel(h.bundle(true).data));
    expect(w.node.querySelector(".qwenbook-error")).toBeNull();
    expect(text(w.node.querySelector(".qwenbook-dial-label"))).toBe("13%");
    expect(w.node.querySelector(".qwenbook-sparkline")).not.toBeNull();
    expect(Object.keys(h.bundle(true).data)).toContain(GPU_MIME);
    expect(Object.keys(chatBundle({ state: "done", messages: [] }).data)).toContain(CHAT_MIME);
  });
});
