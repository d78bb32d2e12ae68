import { afterEach, describe, expect, it } from "vitest";
import type { TrainBundle } from "./bundles.gen";
import { TRAIN_MIME } from "./mime";
import type { PlotBackend } from "./plotly";
import { render, text, train, words } from "./testutil";
import { TRACE, lrTicks, smooth, type Figure } from "./train-figure";
import { TrainWidget, trainRendererFactory } from "./train";

/** Records what would have been plotted, since Plotly cannot lay out in a simulated DOM. */
class RecordingBackend implements PlotBackend {
  figures: Figure[] = [];
  fail: Error | undefined;
  purged = 0;
  async draw(_el: HTMLElement, figure: Figure): Promise<void> {
    await Promise.resolve();
    if (this.fail) throw this.fail;
    this.figures.push(figure);
  }
  resize(): void {}
  purge(): void {
    this.purged += 1;
  }
  get last(): Figure {
    return this.figures[this.figures.length - 1];
  }
  trace(uid: string) {
    return this.last.data.find((d) => (d as { uid?: string }).uid === uid) as
      | { x: number[]; y: Array<number | null>; yaxis?: string; mode?: string }
      | undefined;
  }
}

let widgets: TrainWidget[] = [];
async function show(bundle: unknown, backend = new RecordingBackend()) {
  const w = new TrainWidget(backend);
  widgets.push(w);
  await render(w, TRAIN_MIME, bundle);
  return { w, backend };
}
afterEach(() => {
  widgets.forEach((w) => w.dispose());
  widgets = [];
});

describe("training dashboard", () => {
  it("is registered as safe for the train MIME type", () => {
    expect(trainRendererFactory.mimeTypes).toEqual([TRAIN_MIME]);
    expect(trainRendererFactory.safe).toBe(true);
  });

  it("plots every logged step, a smoothed line, eval points and lr on a second axis", async () => {
    const { backend } = await show(train());
    const loss = backend.trace(TRACE.loss)!;
    expect(loss.x).toHaveLength(50);
    expect(loss.y).toHaveLength(50);
    const smoothed = backend.trace(TRACE.smoothed)!;
    expect(smoothed.y).toHaveLength(50);
    expect(smoothed.y[49]).toBeGreaterThan(loss.y[49]!); // a falling curve's average lags above it
    expect(backend.trace(TRACE.eval)).toMatchObject({ x: [25, 50], y: [0.6, 0.45], mode: "lines+markers" });
    expect(backend.trace(TRACE.lr)).toMatchObject({ yaxis: "y2" });
    expect(backend.last.layout.yaxis2).toMatchObject({ overlaying: "y", side: "right" });
    expect(backend.last.layout.xaxis?.range).toEqual([0, 100]);
  });

  it("shows progress with step, epoch, ETA and throughput", async () => {
    const { w } = await show(train());
    expect(w.node.querySelector(".qwenbook-progress-fill")?.getAttribute("style")).toBe("width: 50.00%");
    expect([...w.node.querySelectorAll(".qwenbook-progress-text span")].map((s) => s.textContent)).toEqual([
      "step 50 / 100 (50%)",
      "epoch 1.50 / 3",
      "ETA 42 s",
      "elapsed 42 s",
      "5,819 tokens/s",
    ]);
    expect(text(w.node.querySelector(".qwenbook-badge-live"))).toBe("training…");
  });

  it("says when maxSteps set the run's length instead of epochs, beside the true epoch count", async () => {
    // Tutorial 02's quick run: 7 rows at 16 rows per step make one step an epoch, so maxSteps(8)
    // runs 8 epochs although the builder says .epochs(3).
    const quick = { step: 8, totalSteps: 8, epoch: 8, totalEpochs: 8, epochsOption: 3, elapsedS: 56 };
    const { w } = await show(train({ state: "done", progress: quick }, 8));
    expect([...w.node.querySelectorAll(".qwenbook-progress-text span")].map((s) => s.textContent)).toEqual([
      "step 8 / 8 (100%)",
      "epoch 8.00 / 8",
      "maxSteps overrides epochs 3",
      "elapsed 56 s",
    ]);
    // The full data set: the step cap ends the run part-way through its second epoch.
    const capped = { step: 8, totalSteps: 8, epoch: 1.6, totalEpochs: 1.6, epochsOption: 3 };
    const { w: w2 } = await show(train({ state: "done", progress: capped }, 8));
    expect([...w2.node.querySelectorAll(".qwenbook-progress-text span")].slice(0, 3).map((s) => s.textContent)).toEqual([
      "step 8 / 8 (100%)",
      "epoch 1.60 / 1.6",
      "maxSteps overrides epochs 3",
    ]);
  });

  it("labels the learning-rate axis with round ticks in one exponent", async () => {
    // A cosine schedule peaking at 1e-4; Plotly's automatic ticks fell on 1.9e-5, 5.7e-5 and 9.5e-5.
    const { backend } = await show(train());
    expect(backend.last.layout.yaxis2).toMatchObject({
      tickmode: "array",
      tickvals: [0, 5e-5, 1e-4],
      ticktext: ["0", "0.5e-4", "1.0e-4"],
    });
    const range = backend.last.layout.yaxis2?.range as number[];
    expect(range[0]).toBe(0);
    expect(range[1]).toBeGreaterThan(1e-4);
    expect(range[1]).toBeLessThan(1.1e-4);
    expect(lrTicks(9.5e-5)?.tickvals).toEqual([0, 5e-5, 1e-4]);
    expect(lrTicks(2e-4)?.ticktext).toEqual(["0", "0.5e-4", "1.0e-4", "1.5e-4", "2.0e-4"]);
    expect(lrTicks(3e-4)?.ticktext).toEqual(["0", "1e-4", "2e-4", "3e-4"]);
    expect(lrTicks(2.5e-5)?.ticktext).toEqual(["0", "1e-5", "2e-5", "3e-5"]);
    expect(lrTicks(1.5e-3)?.ticktext).toEqual(["0", "0.5e-3", "1.0e-3", "1.5e-3"]);
    expect(lrTicks(0)).toBeUndefined();
  });

  it("leaves the learning-rate axis to Plotly when every logged rate is zero", async () => {
    const { backend } = await show(train({ train: { step: [1, 2], loss: [1, 0.9], lr: [0, 0] } }, 2));
    expect(backend.last.layout.yaxis2).toMatchObject({ tickformat: ".1e", rangemode: "tozero" });
    expect(backend.last.layout.yaxis2).not.toHaveProperty("tickvals");
  });

  it("shows the latest loss, the best eval and the learning rate", async () => {
    const { w } = await show(train());
    const metrics = [...w.node.querySelectorAll(".qwenbook-metric")].map((m) => words(m));
    expect(metrics[0]).toMatch(/^loss 0\.2828 smoothed 0\.\d{4}$/);
    expect(metrics[1]).toBe("eval loss 0.4500 best 0.4500 @ step 50");
    expect(metrics[2]).toBe("learning rate 5.0e-5");
  });

  it("draws a preference run's rewards and accuracy in a panel under the loss, with tiles beside it", async () => {
    const base = train({}, 4);
    const metrics = {
      "rewards/margins": [0, 0.4, 0.9, 1.5],
      "rewards/chosen": [0, 0.2, 0.5, 0.8],
      "rewards/rejected": [0, -0.2, -0.4, -0.7],
      "rewards/accuracies": [0, 0.5, 1, 1],
    };
    const { w, backend } = await show({ ...base, train: { ...base.train, metrics } });
    expect(backend.trace(TRACE.margin)).toMatchObject({ x: [1, 2, 3, 4], y: metrics["rewards/margins"], yaxis: "y3" });
    expect(backend.trace(TRACE.chosen)).toMatchObject({ yaxis: "y3" });
    expect(backend.trace(TRACE.rejected)).toMatchObject({ y: metrics["rewards/rejected"] });
    expect(backend.trace(TRACE.accuracy)).toMatchObject({ y: metrics["rewards/accuracies"], yaxis: "y4" });
    expect(backend.trace(TRACE.oddsRatio)).toBeUndefined();
    expect(backend.last.layout.yaxis3).toMatchObject({ domain: [0, 0.36] });
    expect(backend.last.layout.yaxis).toMatchObject({ domain: [0.46, 1] });
    expect(backend.last.layout.xaxis).toMatchObject({ anchor: "y3" });
    const tiles = [...w.node.querySelectorAll(".qwenbook-metric")].map((m) => words(m));
    expect(tiles[3]).toBe("reward margin 1.500 chosen 0.8000 · rejected -0.7000");
    expect(tiles[4]).toBe("preference accuracy 100% pairs whose chosen reward is higher");
  });

  it("adds ORPO's log odds ratio, and draws no preference panel for a supervised run", async () => {
    const base = train({}, 2);
    const orpo = { "rewards/margins": [0.1, 0.2], "rewards/accuracies": [0.5, 1], log_odds_ratio: [-0.6, -0.4], nll_loss: [2.1, 1.9] };
    const { w, backend } = await show({ ...base, train: { ...base.train, metrics: orpo } });
    expect(backend.trace(TRACE.oddsRatio)).toMatchObject({ y: [-0.6, -0.4], yaxis: "y3" });
    expect(words(w.node.querySelectorAll(".qwenbook-metric")[5]!)).toBe("log odds ratio -0.4000 NLL 1.900");
    const plain = await show(train({}, 2));
    expect(plain.backend.trace(TRACE.margin)).toBeUndefined();
    expect(plain.backend.last.layout.yaxis3).toBeUndefined();
    expect(plain.w.node.querySelectorAll(".qwenbook-metric")).toHaveLength(3);
  });

  it("lists the run config in a collapsed table", async () => {
    const { w } = await show(train());
    const details = w.node.querySelector("details.qwenbook-train-config") as HTMLDetailsElement;
    expect(details.open).toBe(false);
    expect(text(details.querySelector("summary"))).toBe("Run config (5 options)");
    expect([...details.querySelectorAll("tr")].map((r) => words(r))).toEqual([
      "r 8",
      "alpha 32",
      "lr 1.0e-4",
      "dataset data/huanhuan.json",
      "packing false",
    ]);
  });

  it("keeps the config table open across updates once the user opened it", async () => {
    const { w } = await show(train());
    (w.node.querySelector("details.qwenbook-train-config") as HTMLDetailsElement).open = true;
    await render(w, TRAIN_MIME, train({}, 51));
    expect((w.node.querySelector("details.qwenbook-train-config") as HTMLDetailsElement).open).toBe(true);
  });

  it("ends as done with the time taken", async () => {
    const { w } = await show(train({ state: "done", progress: { step: 100, totalSteps: 100, elapsedS: 754 } }));
    expect(text(w.node.querySelector(".qwenbook-train-note-ok"))).toBe("Finished 100 steps in 12m 34s.");
    expect(text(w.node.querySelector(".qwenbook-badge-ok"))).toBe("done");
    expect(w.node.querySelector(".qwenbook-progress-fill")?.getAttribute("style")).toBe("width: 100.00%");
    expect(w.node.textContent).not.toContain("ETA");
  });

  it("ends as cancelled with the last checkpoint", async () => {
    const { w } = await show(train({ state: "cancelled", checkpoint: "runs/huanhuan/checkpoint-40" }));
    expect(text(w.node.querySelector(".qwenbook-train-note-warn"))).toBe(
      "Cancelled at step 50. Last checkpoint: runs/huanhuan/checkpoint-40",
    );
  });

  it("says so when a cancelled run has no checkpoint", async () => {
    const { w } = await show(train({ state: "cancelled" }));
    expect(text(w.node.querySelector(".qwenbook-train-note-warn"))).toBe("Cancelled at step 50. No checkpoint was written.");
  });

  it("ends as failed with the error and hint", async () => {
    const { w } = await show(
      train({
        state: "failed",
        error: { name: "OutOfMemoryError", message: "CUDA out of memory. Tried to allocate 2.00 GiB", hint: "Lower batchSize." },
        checkpoint: "runs/x/checkpoint-20",
      }),
    );
    const box = w.node.querySelector(".qwenbook-train-status .qwenbook-error")!;
    expect(text(box.querySelector(".qwenbook-error-title"))).toBe("Training failed: OutOfMemoryError");
    expect(text(box.querySelector(".qwenbook-error-hint"))).toBe("Lower batchSize. Last checkpoint: runs/x/checkpoint-20");
    expect(w.node.querySelector(".qwenbook-train-plot")?.hasAttribute("hidden")).toBe(false);
  });

  it("waits for the first step before drawing a chart", async () => {
    const { w, backend } = await show(train({ train: { step: [], loss: [] }, eval: undefined, progress: { step: 0, totalSteps: 10 } }));
    expect(backend.figures).toHaveLength(0);
    expect(text(w.node.querySelector(".qwenbook-train-plot-message"))).toBe("The chart appears with the first logged step.");
  });

  it("keeps the dashboard when the chart library fails, and says why", async () => {
    const backend = new RecordingBackend();
    backend.fail = new Error("Loading chunk 409 failed");
    const { w } = await show(train(), backend);
    expect(text(w.node.querySelector(".qwenbook-train-plot-message"))).toBe("The loss chart could not be drawn: Loading chunk 409 failed");
    expect(w.node.querySelector(".qwenbook-progress-fill")).not.toBeNull();
  });

  it("collapses updates that arrive while a chart is drawing into the newest", async () => {
    const backend = new RecordingBackend();
    const w = new TrainWidget(backend);
    widgets.push(w);
    const updates = [10, 11, 12, 13].map((n) => render(w, TRAIN_MIME, train({}, n)));
    await Promise.all(updates);
    expect(backend.figures.map((f) => (f.data[0] as { x: number[] }).x.length)).toEqual([10, 13]);
  });

  it("draws only once attached, when it can measure itself", async () => {
    const backend = new RecordingBackend();
    const w = new TrainWidget(backend);
    widgets.push(w);
    await w.renderModel({ trusted: false, metadata: {}, setData: () => undefined, data: { [TRAIN_MIME]: train() as never } });
    expect(backend.figures).toHaveLength(0);
    const { Widget } = await import("@lumino/widgets");
    Widget.attach(w, document.body);
    await new Promise((r) => setTimeout(r, 0));
    expect(backend.figures).toHaveLength(1);
  });

  it("frees the chart when disposed", async () => {
    const { w, backend } = await show(train());
    w.dispose();
    expect(backend.purged).toBe(1);
  });

  it("draws gaps where the loss was not finite", async () => {
    const b: TrainBundle = train({ train: { step: [1, 2, 3], loss: [1, null, 0.5] }, eval: undefined });
    const { backend } = await show(b);
    expect(backend.trace(TRACE.loss)?.y).toEqual([1, null, 0.5]);
    expect(backend.trace(TRACE.lr)).toBeUndefined();
  });
});

describe("smooth", () => {
  it("is debiased at the start and follows a constant exactly", () => {
    expect(smooth([2, 2, 2], 0.9)).toEqual([2, 2, 2].map((v) => expect.closeTo(v, 10)));
  });
  it("skips gaps without letting them pull the average", () => {
    const s = smooth([1, null, 1], 0.5);
    expect(s[1]).toBeNull();
    expect(s[2]).toBeCloseTo(1, 10);
  });
});
