import type { IRenderMime } from "@jupyterlab/rendermime-interfaces";
import type { Message } from "@lumino/messaging";
import type { TrainBundle } from "./bundles.gen";
import { h, replaceChildren } from "./dom";
import { errorBox } from "./error-box";
import { formatDuration, formatInt, formatLoss, formatLr, formatRate, formatValue } from "./format";
import { TRAIN_MIME } from "./mime";
import { BundleWidget } from "./widget";
import { plotlyBackend, type PlotBackend } from "./plotly";
import { buildFigure, readTheme, smooth, smoothingWeight, type Figure } from "./train-figure";

const STATE_LABEL: Record<TrainBundle["state"], string> = {
  running: "training…",
  done: "done",
  cancelled: "cancelled",
  failed: "failed",
};
const STATE_BADGE: Record<TrainBundle["state"], string> = {
  running: "qwenbook-badge-live",
  done: "qwenbook-badge-ok",
  cancelled: "qwenbook-badge-warn",
  failed: "qwenbook-badge-error",
};

/** The training dashboard: progress, headline numbers, the loss chart and the run's config. */
export class TrainWidget extends BundleWidget<typeof TRAIN_MIME> {
  private readonly root = h("div", { class: "qwenbook-train" });
  private readonly header = h("div", { class: "qwenbook-train-header" });
  private readonly progress = h("div", { class: "qwenbook-progress" });
  private readonly metrics = h("div", { class: "qwenbook-train-metrics" });
  private readonly status = h("div", { class: "qwenbook-train-status" });
  private readonly plot = h("div", { class: "qwenbook-train-plot" });
  private readonly plotMessage = h("div", { class: "qwenbook-train-plot-message" });
  private readonly config = h("details", { class: "qwenbook-train-config" });
  private last: TrainBundle | undefined;
  private pendingFigure: Figure | undefined;
  private plotting: Promise<void> | undefined;
  private resizeObserver: ResizeObserver | undefined;
  private themeObserver: MutationObserver | undefined;

  constructor(private readonly backend: PlotBackend = plotlyBackend) {
    super(TRAIN_MIME);
    this.root.append(this.header, this.progress, this.metrics, this.status, this.plot, this.plotMessage, this.config);
    this.body.append(this.root);
  }

  protected draw(bundle: TrainBundle): Promise<void> {
    this.last = bundle;
    this.root.dataset.state = bundle.state;
    this.drawHeader(bundle);
    this.drawProgress(bundle);
    this.drawMetrics(bundle);
    this.drawStatus(bundle);
    this.drawConfig(bundle);
    return this.schedulePlot(bundle);
  }

  protected override onAfterAttach(msg: Message): void {
    super.onAfterAttach(msg);
    if (typeof ResizeObserver !== "undefined") {
      this.resizeObserver = new ResizeObserver(() => this.backend.resize(this.plot));
      this.resizeObserver.observe(this.plot);
    }
    // A theme switch changes the CSS variables, and the chart's colours were read from them.
    this.themeObserver = new MutationObserver(() => this.last && void this.schedulePlot(this.last));
    this.themeObserver.observe(document.body, { attributes: true, attributeFilter: ["data-jp-theme-light", "data-jp-theme-name"] });
    if (this.last) void this.schedulePlot(this.last);
  }

  protected override onBeforeDetach(msg: Message): void {
    this.resizeObserver?.disconnect();
    this.themeObserver?.disconnect();
    super.onBeforeDetach(msg);
  }

  override dispose(): void {
    if (this.isDisposed) return;
    this.resizeObserver?.disconnect();
    this.themeObserver?.disconnect();
    this.backend.purge(this.plot);
    super.dispose();
  }

  private drawHeader(b: TrainBundle): void {
    replaceChildren(
      this.header,
      h("span", { class: "qwenbook-train-title" }, b.title ?? "Training"),
      h("span", { class: `qwenbook-badge ${STATE_BADGE[b.state]}` }, STATE_LABEL[b.state]),
    );
  }

  private drawProgress(b: TrainBundle): void {
    const { step, totalSteps, epoch, totalEpochs, epochsOption, etaS, elapsedS, tokensPerSecond } = b.progress;
    const fraction = totalSteps > 0 ? Math.min(1, step / totalSteps) : b.state === "done" ? 1 : 0;
    const facts: string[] = [`step ${formatInt(step)} / ${formatInt(totalSteps)} (${Math.floor(fraction * 100)}%)`];
    if (epoch !== undefined) facts.push(`epoch ${epoch.toFixed(2)}${totalEpochs !== undefined ? ` / ${formatValue(totalEpochs)}` : ""}`);
    // The epoch count is the real passes over the data; when maxSteps set the length, say so beside .epochs(n).
    if (epochsOption !== undefined) facts.push(`maxSteps overrides epochs ${formatValue(epochsOption)}`);
    if (b.state === "running" && etaS !== undefined) facts.push(`ETA ${formatDuration(etaS)}`);
    if (elapsedS !== undefined) facts.push(`elapsed ${formatDuration(elapsedS)}`);
    if (tokensPerSecond !== undefined) facts.push(`${formatRate(tokensPerSecond)} tokens/s`);
    replaceChildren(
      this.progress,
      h(
        "div",
        {
          class: "qwenbook-progress-track",
          role: "progressbar",
          "aria-valuemin": 0,
          "aria-valuemax": totalSteps,
          "aria-valuenow": step,
        },
        h("div", { class: "qwenbook-progress-fill", style: `width: ${(fraction * 100).toFixed(2)}%` }),
      ),
      h("div", { class: "qwenbook-progress-text" }, ...facts.map((f) => h("span", {}, f))),
    );
  }

  private drawMetrics(b: TrainBundle): void {
    const { train, eval: evals } = b;
    const lastLoss = lastFinite(train.loss);
    const smoothed = lastFinite(smooth(train.loss, smoothingWeight(train.loss.length)));
    const best = bestEval(b);
    const metric = (label: string, value: string, sub?: string) =>
      h(
        "div",
        { class: "qwenbook-metric" },
        h("div", { class: "qwenbook-metric-label" }, label),
        h("div", { class: "qwenbook-metric-value" }, value),
        sub ? h("div", { class: "qwenbook-metric-sub" }, sub) : null,
      );
    replaceChildren(
      this.metrics,
      metric("loss", formatLoss(lastLoss), `smoothed ${formatLoss(smoothed)}`),
      metric(
        "eval loss",
        formatLoss(evals ? lastFinite(evals.loss) : undefined),
        best ? `best ${formatLoss(best.loss)} @ step ${formatInt(best.step)}` : "not evaluated yet",
      ),
      metric("learning rate", formatLr(train.lr?.[train.lr.length - 1])),
      ...preferenceTiles(train.metrics, metric),
    );
  }

  private drawStatus(b: TrainBundle): void {
    const { step, elapsedS } = b.progress;
    const ckpt = b.checkpoint;
    let content: Node | null = null;
    if (b.state === "done") {
      content = h(
        "div",
        { class: "qwenbook-train-note qwenbook-train-note-ok" },
        `Finished ${formatInt(step)} steps${elapsedS !== undefined ? ` in ${formatDuration(elapsedS)}` : ""}.`,
        ckpt ? h("span", {}, " Saved to ", h("code", {}, ckpt)) : null,
      );
    } else if (b.state === "cancelled") {
      content = h(
        "div",
        { class: "qwenbook-train-note qwenbook-train-note-warn" },
        `Cancelled at step ${formatInt(step)}.`,
        ckpt ? h("span", {}, " Last checkpoint: ", h("code", {}, ckpt)) : " No checkpoint was written.",
      );
    } else if (b.state === "failed") {
      content = errorBox({
        title: b.error ? `Training failed: ${b.error.name}` : "Training failed",
        detail: b.error?.message ?? "The worker reported a failure without a message.",
        hint: [b.error?.hint, ckpt ? `Last checkpoint: ${ckpt}` : undefined].filter(Boolean).join(" "),
      });
    }
    replaceChildren(this.status, content);
    this.status.hidden = content === null;
  }

  private drawConfig(b: TrainBundle): void {
    const entries = Object.entries(b.config ?? {});
    this.config.hidden = entries.length === 0;
    const wasOpen = this.config.open;
    replaceChildren(
      this.config,
      h("summary", {}, `Run config (${entries.length} option${entries.length === 1 ? "" : "s"})`),
      h(
        "table",
        {},
        h("tbody", {}, ...entries.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, formatValue(v))))),
      ),
    );
    this.config.open = wasOpen;
  }

  /** Charts are drawn one at a time; updates arriving meanwhile collapse into the newest. */
  private schedulePlot(b: TrainBundle): Promise<void> {
    const empty = b.train.step.length === 0 && (b.eval?.step.length ?? 0) === 0;
    this.plot.hidden = empty;
    this.plotMessage.textContent = empty ? "The chart appears with the first logged step." : "";
    this.plotMessage.hidden = !empty;
    if (empty) return Promise.resolve();
    this.pendingFigure = buildFigure(b, readTheme(this.node));
    if (!this.isAttached) return Promise.resolve(); // drawn on attach, when the chart can measure itself
    this.plotting ??= this.flushPlot().finally(() => (this.plotting = undefined));
    return this.plotting;
  }

  private async flushPlot(): Promise<void> {
    while (this.pendingFigure) {
      const figure = this.pendingFigure;
      this.pendingFigure = undefined;
      try {
        await this.backend.draw(this.plot, figure);
        if (!this.plot.hidden) this.plotMessage.hidden = true;
      } catch (err) {
        this.plotMessage.hidden = false;
        this.plotMessage.textContent = `The loss chart could not be drawn: ${err instanceof Error ? err.message : String(err)}`;
      }
    }
  }
}

/** A preference run's tiles beside the loss: reward margin (with chosen/rejected), accuracy, ORPO's odds term. */
function preferenceTiles(
  metrics: Readonly<Record<string, Array<number | null> | undefined>> | undefined,
  metric: (label: string, value: string, sub?: string) => HTMLElement,
): HTMLElement[] {
  const last = (name: string) => lastFinite(metrics?.[name]);
  const margin = last("rewards/margins");
  if (margin === undefined) return [];
  const tiles = [
    metric("reward margin", margin.toFixed(3), `chosen ${formatLoss(last("rewards/chosen"))} · rejected ${formatLoss(last("rewards/rejected"))}`),
    metric("preference accuracy", `${Math.round((last("rewards/accuracies") ?? 0) * 100)}%`, "pairs whose chosen reward is higher"),
  ];
  const odds = last("log_odds_ratio");
  if (odds !== undefined) tiles.push(metric("log odds ratio", odds.toFixed(4), `NLL ${formatLoss(last("nll_loss"))}`));
  return tiles;
}

function lastFinite(values: ReadonlyArray<number | null> | undefined): number | undefined {
  if (!values) return undefined;
  for (let i = values.length - 1; i >= 0; i--) {
    const v = values[i];
    if (v !== null && Number.isFinite(v)) return v;
  }
  return undefined;
}

function bestEval(b: TrainBundle): { step: number; loss: number } | undefined {
  let best: { step: number; loss: number } | undefined;
  b.eval?.loss.forEach((loss, i) => {
    if (loss !== null && (!best || loss < best.loss)) best = { step: b.eval!.step[i], loss };
  });
  return best;
}

export const trainRendererFactory: IRenderMime.IRendererFactory = {
  safe: true,
  mimeTypes: [TRAIN_MIME],
  defaultRank: 10,
  createRenderer: () => new TrainWidget(),
};
