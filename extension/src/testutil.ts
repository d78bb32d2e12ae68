import type { IRenderMime } from "@jupyterlab/rendermime-interfaces";
import { Widget } from "@lumino/widgets";
import type { ChatBundle, GpuBundle, TrainBundle } from "./bundles.gen";

/** A MIME model as JupyterLab hands it to a renderer. */
export function mimeModel(data: Record<string, unknown>): IRenderMime.IMimeModel {
  return {
    trusted: false,
    data: data as IRenderMime.IMimeModel["data"],
    metadata: {},
    setData: () => undefined,
  };
}

/** Renders `bundle` under `mime` into a widget attached to the document, as an output area would. */
export async function render<W extends Widget & IRenderMime.IRenderer>(
  widget: W,
  mime: string,
  bundle: unknown,
  plain = "plain text fallback",
): Promise<W> {
  if (!widget.isAttached) Widget.attach(widget, document.body);
  await widget.renderModel(mimeModel({ [mime]: bundle, "text/plain": plain }));
  return widget;
}

/** Text of `el` with a space between elements, as a reader sees separate cells and labels. */
export function words(el: Element | null | undefined): string {
  if (!el) return "";
  if (el.children.length === 0) return text(el);
  return [...el.children].map(words).filter(Boolean).join(" ");
}

export function text(el: Element | null | undefined): string {
  return (el?.textContent ?? "").replace(/\s+/g, " ").trim();
}

export function chat(overrides: Partial<ChatBundle> = {}): ChatBundle {
  return {
    version: 1,
    model: "Qwen/Qwen2.5-7B-Instruct",
    state: "done",
    messages: [
      { role: "system", content: "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." },
      { role: "user", content: "你好" },
      { role: "assistant", content: "你好！有什么我可以帮你的吗？" },
    ],
    stats: { completionTokens: 16, promptTokens: 30, ttftMs: 84, durationMs: 412, tokensPerSecond: 38.8, finishReason: "stop" },
    ...overrides,
  };
}

export function train(overrides: Partial<TrainBundle> = {}, steps = 50): TrainBundle {
  const step = Array.from({ length: steps }, (_, i) => i + 1);
  return {
    version: 1,
    state: "running",
    title: "LoRA r=8",
    progress: { step: steps, totalSteps: 100, epoch: 1.5, totalEpochs: 3, elapsedS: 42, etaS: 42, tokensPerSecond: 5819 },
    train: {
      step,
      loss: step.map((s) => 2 / Math.sqrt(s)),
      lr: step.map((s) => 1e-4 * (1 - s / 100)),
    },
    eval: { step: [25, 50], loss: [0.6, 0.45] },
    config: { r: 8, alpha: 32, lr: 1e-4, dataset: "data/huanhuan.json", packing: false },
    ...overrides,
  };
}

const GiB = 1024 ** 3;

export function gpu(overrides: Partial<GpuBundle> = {}): GpuBundle {
  return {
    version: 1,
    time: 1_700_000_000,
    intervalS: 1,
    live: true,
    devices: [
      {
        device: "cuda:0",
        kind: "cuda",
        name: "NVIDIA H100 80GB HBM3",
        used: 31.5 * GiB,
        reserved: 40 * GiB,
        peak: 48 * GiB,
        total: 80 * GiB,
        history: [10, 20, 30, 31.5].map((g) => g * GiB),
      },
    ],
    ...overrides,
  };
}
