import type { Figure } from "./train-figure";

/** What the training widget needs from a chart library; tests pass a recorder instead of Plotly. */
export interface PlotBackend {
  /** Draws or redraws `figure` into `el`. */
  draw(el: HTMLElement, figure: Figure): Promise<void>;
  /** Fits the chart to `el`'s current size. */
  resize(el: HTMLElement): void;
  /** Frees what the chart holds on `el`. */
  purge(el: HTMLElement): void;
}

interface PlotlyApi {
  react(el: HTMLElement, data: Figure["data"], layout: Figure["layout"], config: Figure["config"]): Promise<unknown>;
  purge(el: HTMLElement): void;
  Plots: { resize(el: HTMLElement): unknown };
}

let plotly: Promise<PlotlyApi> | undefined;

/** Plotly is about 4 MB, so it is a separate chunk fetched when the first chart is drawn. */
function loadPlotly(): Promise<PlotlyApi> {
  plotly ??= import("plotly.js-dist-min").then((m) => ((m as { default?: PlotlyApi }).default ?? m) as PlotlyApi);
  return plotly;
}

export const plotlyBackend: PlotBackend = {
  async draw(el, figure) {
    const api = await loadPlotly();
    await api.react(el, figure.data, figure.layout, figure.config);
  },
  resize(el) {
    // Only a chart that was drawn has anything to resize; resize() on a bare div throws.
    if (el.classList.contains("js-plotly-plot")) void loadPlotly().then((api) => api.Plots.resize(el));
  },
  purge(el) {
    if (el.classList.contains("js-plotly-plot")) void loadPlotly().then((api) => api.purge(el));
  },
};
