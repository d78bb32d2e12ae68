import type { Config, Data, Layout } from "plotly.js-dist-min";
import type { TrainBundle } from "./bundles.gen";

/** The colours a chart takes from the JupyterLab theme, so it reads in light and dark themes alike. */
export interface ChartTheme {
  text: string;
  muted: string;
  grid: string;
  loss: string;
  eval: string;
  font: string;
}

export interface Figure {
  data: Data[];
  layout: Partial<Layout>;
  config: Partial<Config>;
}

/** Stable trace ids; Plotly puts them in the SVG class names, which the browser tests look for. */
export const TRACE = {
  loss: "loss",
  smoothed: "loss-smoothed",
  eval: "eval-loss",
  lr: "lr",
  margin: "reward-margin",
  chosen: "reward-chosen",
  rejected: "reward-rejected",
  accuracy: "reward-accuracy",
  oddsRatio: "log-odds-ratio",
} as const;

/** The preference metrics the lower panel draws: [metric name (TRL's), trace id, legend name, dash]. */
const PREFERENCE_TRACES = [
  ["rewards/margins", TRACE.margin, "reward margin", "solid"],
  ["rewards/chosen", TRACE.chosen, "chosen reward", "dot"],
  ["rewards/rejected", TRACE.rejected, "rejected reward", "dash"],
  ["log_odds_ratio", TRACE.oddsRatio, "log odds ratio (ORPO)", "dashdot"],
] as const;

const FALLBACK_THEME: ChartTheme = {
  text: "rgba(0, 0, 0, 0.87)",
  muted: "rgba(0, 0, 0, 0.54)",
  grid: "#e0e0e0",
  loss: "#1976d2",
  eval: "#f57c00",
  font: "system-ui, sans-serif",
};

/** Reads the theme from JupyterLab's CSS variables as they apply to `el`. */
export function readTheme(el: Element): ChartTheme {
  const style = getComputedStyle(el);
  const v = (name: string, fallback: string) => style.getPropertyValue(name).trim() || fallback;
  return {
    text: v("--jp-ui-font-color1", FALLBACK_THEME.text),
    muted: v("--jp-ui-font-color2", FALLBACK_THEME.muted),
    grid: v("--jp-border-color2", FALLBACK_THEME.grid),
    loss: v("--jp-brand-color1", FALLBACK_THEME.loss),
    eval: v("--jp-warn-color1", FALLBACK_THEME.eval),
    font: v("--jp-ui-font-family", FALLBACK_THEME.font),
  };
}

/**
 * Exponential moving average with TensorBoard's start-up debiasing, so the first points are not
 * dragged towards zero. Gaps (null: a non-finite loss) stay gaps and do not poison the average.
 */
export function smooth(values: ReadonlyArray<number | null>, weight: number): Array<number | null> {
  let last = 0;
  let n = 0;
  return values.map((v) => {
    if (v === null) return null;
    last = last * weight + (1 - weight) * v;
    n += 1;
    return last / (1 - weight ** n);
  });
}

/** More points take more smoothing (an averaging window of about a tenth of the run), from 0.6 to 0.95. */
export function smoothingWeight(points: number): number {
  return Math.min(0.95, Math.max(0.6, 1 - 10 / Math.max(points, 1)));
}

export interface AxisTicks {
  tickvals: number[];
  ticktext: string[];
  /** The highest tick: the axis runs from 0 to a little above it. */
  top: number;
}

const MAX_LR_INTERVALS = 4;

/**
 * Round ticks for the learning-rate axis, from 0 up to the first round value at or above `max`:
 * steps of 1, 2 or 5 times a power of ten, at most four intervals, labelled in the top tick's
 * exponent ("0", "0.5e-4", "1.0e-4"). Plotly's own ticks for a 1e-4 cosine schedule fall on
 * values such as 1.9e-5, 5.7e-5 and 9.5e-5, which are hard to read off. Undefined when there is
 * nothing above zero to scale.
 */
export function lrTicks(max: number): AxisTicks | undefined {
  if (!Number.isFinite(max) || max <= 0) return undefined;
  let power = 10 ** Math.floor(Math.log10(max / MAX_LR_INTERVALS));
  let step = power;
  for (;;) {
    const found = [1, 2, 5].map((m) => m * power).find((s) => Math.ceil(clean(max / s)) <= MAX_LR_INTERVALS);
    if (found !== undefined) {
      step = found;
      break;
    }
    power *= 10;
  }
  const intervals = Math.max(1, Math.ceil(clean(max / step)));
  const tickvals = Array.from({ length: intervals + 1 }, (_, i) => clean(i * step));
  const top = tickvals[tickvals.length - 1];
  const exponent = Math.floor(Math.log10(top) + 1e-9);
  const scale = 10 ** exponent;
  // As many decimals as the step needs in that exponent: 5e-5 in units of 1e-4 is 0.5, one decimal.
  const decimals = Math.max(0, -Math.floor(Math.log10(step / scale) + 1e-9));
  const ticktext = tickvals.map((v) => (v === 0 ? "0" : `${(v / scale).toFixed(decimals)}e${exponent}`));
  return { tickvals, ticktext, top };
}

/** Drops floating-point noise such as 1.5000000000000002e-4. */
function clean(x: number): number {
  return Number(x.toPrecision(12));
}

/** The loss chart: raw and smoothed train loss, eval points, and the learning rate on a right-hand axis. */
export function buildFigure(bundle: TrainBundle, theme: ChartTheme): Figure {
  const { train, eval: evals, progress } = bundle;
  const data: Data[] = [
    {
      type: "scatter",
      mode: "lines",
      uid: TRACE.loss,
      name: "loss",
      x: train.step,
      y: train.loss,
      // simplify off: every logged step stays a vertex, so what is drawn is what was logged.
      line: { color: theme.loss, width: 1, simplify: false },
      opacity: 0.35,
      hovertemplate: "%{y:.4f}",
    },
    {
      type: "scatter",
      mode: "lines",
      uid: TRACE.smoothed,
      name: "loss (smoothed)",
      x: train.step,
      y: smooth(train.loss, smoothingWeight(train.step.length)),
      line: { color: theme.loss, width: 2 },
      hovertemplate: "%{y:.4f}",
    },
  ];
  if (evals && evals.step.length > 0) {
    data.push({
      type: "scatter",
      mode: "lines+markers",
      uid: TRACE.eval,
      name: "eval loss",
      x: evals.step,
      y: evals.loss,
      line: { color: theme.eval, width: 1.5, dash: "dot" },
      marker: { color: theme.eval, size: 7 },
      hovertemplate: "%{y:.4f}",
    });
  }
  if (train.lr && train.lr.length > 0) {
    data.push({
      type: "scatter",
      mode: "lines",
      uid: TRACE.lr,
      name: "learning rate",
      x: train.step,
      y: train.lr,
      yaxis: "y2",
      line: { color: theme.muted, width: 1, dash: "dash" },
      hovertemplate: "%{y:.2e}",
    });
  }
  const metrics = train.metrics ?? {};
  const preference = metrics["rewards/margins"] !== undefined;
  if (preference) {
    for (const [name, uid, label, dash] of PREFERENCE_TRACES) {
      if (!metrics[name]) continue;
      data.push({
        type: "scatter",
        mode: "lines",
        uid,
        name: label,
        x: train.step,
        y: metrics[name],
        yaxis: "y3",
        line: { color: uid === TRACE.rejected ? theme.eval : theme.loss, width: uid === TRACE.margin ? 2 : 1.2, dash, simplify: false },
        hovertemplate: "%{y:.4f}",
      });
    }
    if (metrics["rewards/accuracies"]) {
      data.push({
        type: "scatter",
        mode: "lines",
        uid: TRACE.accuracy,
        name: "preference accuracy",
        x: train.step,
        y: metrics["rewards/accuracies"],
        yaxis: "y4",
        line: { color: theme.muted, width: 1.5, simplify: false },
        hovertemplate: "%{y:.2f}",
      });
    }
  }
  const lastStep = train.step.length > 0 ? train.step[train.step.length - 1] : 0;
  const ticks = lrTicks(Math.max(0, ...(train.lr ?? [])));
  const xMax = Math.max(progress.totalSteps, lastStep, 1);
  const axis = { gridcolor: theme.grid, linecolor: theme.grid, zeroline: false, tickfont: { color: theme.muted } };
  const layout: Partial<Layout> = {
    // A preference run draws its rewards and accuracy in a second panel under the loss, on the same steps.
    height: preference ? 480 : 300,
    autosize: true,
    margin: { l: 56, r: 64, t: 32, b: 40 },
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "rgba(0,0,0,0)",
    font: { family: theme.font, size: 11, color: theme.text },
    // The user's zoom survives live updates as long as this value stays the same.
    uirevision: "qwenbook-train",
    showlegend: true,
    legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom", bgcolor: "rgba(0,0,0,0)" },
    hovermode: "x unified",
    xaxis: { ...axis, title: { text: "step" }, range: [0, xMax] },
    yaxis: { ...axis, title: { text: "loss" }, ...(preference ? { domain: [0.46, 1] } : {}) },
    yaxis2: {
      ...axis,
      title: { text: "learning rate" },
      overlaying: "y",
      side: "right",
      showgrid: false,
      ...(ticks
        ? // A little headroom, so the peak of the schedule does not run along the plot's top edge.
          { tickmode: "array" as const, tickvals: ticks.tickvals, ticktext: ticks.ticktext, range: [0, ticks.top * 1.05] }
        : { tickformat: ".1e", rangemode: "tozero" as const }),
    },
  };
  if (preference) {
    layout.yaxis3 = { ...axis, title: { text: "reward" }, domain: [0, 0.36], anchor: "x", zeroline: true, zerolinecolor: theme.grid };
    layout.yaxis4 = {
      ...axis,
      title: { text: "accuracy" },
      overlaying: "y3",
      side: "right",
      showgrid: false,
      range: [-0.02, 1.02],
      tickmode: "array",
      tickvals: [0, 0.5, 1],
      ticktext: ["0%", "50%", "100%"],
    };
    // The step axis goes under the lower panel, so the two panels read as one chart over the same steps.
    layout.xaxis = { ...layout.xaxis, anchor: "y3" };
  }
  const config: Partial<Config> = {
    displaylogo: false,
    responsive: false,
    displayModeBar: "hover",
    modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d"],
    toImageButtonOptions: { filename: "training-loss" },
  };
  return { data, layout, config };
}
