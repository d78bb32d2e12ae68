import { h } from "./dom";

export interface ErrorBoxContent {
  title: string;
  detail: string;
  hint?: string;
  /** The output's text/plain form, so the reader still gets the data. */
  fallback?: string;
}

/** A readable error in place of a widget: what went wrong, what to do, and the plain-text output. */
export function errorBox({ title, detail, hint, fallback }: ErrorBoxContent): HTMLElement {
  return h(
    "div",
    { class: "qwenbook-error", role: "alert" },
    h("div", { class: "qwenbook-error-title" }, title),
    h("div", { class: "qwenbook-error-detail" }, detail),
    hint ? h("div", { class: "qwenbook-error-hint" }, hint) : null,
    fallback
      ? h(
          "details",
          { class: "qwenbook-error-fallback" },
          h("summary", {}, "Plain-text version"),
          h("pre", {}, fallback),
        )
      : null,
  );
}
