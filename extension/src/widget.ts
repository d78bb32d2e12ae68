import type { IRenderMime } from "@jupyterlab/rendermime-interfaces";
import { Widget } from "@lumino/widgets";
import type { BundleMimeTypes } from "./bundles.gen";
import { h, replaceChildren } from "./dom";
import { errorBox } from "./error-box";
import { BUNDLE_LABEL, type BundleMime } from "./mime";
import { parseBundle, type BundleProblem } from "./validate";

/**
 * The part every Qwenbook renderer shares: validate the bundle, show an error box instead of a blank
 * output when it cannot be shown, and otherwise hand it to `draw`. JupyterLab calls `renderModel`
 * again on the same widget for each `update_display_data`, so `draw` updates in place.
 */
export abstract class BundleWidget<M extends BundleMime> extends Widget implements IRenderMime.IRenderer {
  /** Where subclasses draw; hidden, not emptied, while an error shows, so a later good update can resume. */
  protected readonly body: HTMLDivElement;
  private readonly problemHost: HTMLDivElement;

  constructor(readonly mimeType: M) {
    super();
    this.addClass("qwenbook-output");
    this.body = h("div", { class: "qwenbook-body" });
    this.problemHost = h("div", { class: "qwenbook-problem", hidden: true });
    this.node.append(this.body, this.problemHost);
  }

  async renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    const fallback = plainText(model.data["text/plain"]);
    const parsed = parseBundle(this.mimeType, model.data[this.mimeType]);
    if (!parsed.ok) {
      this.showProblem(parsed.problem, fallback);
      return;
    }
    try {
      this.showBody();
      await this.draw(parsed.bundle);
    } catch (err) {
      const detail = err instanceof Error ? err.message : String(err);
      this.showProblem(
        {
          title: `The ${BUNDLE_LABEL[this.mimeType]} could not be drawn`,
          detail,
          hint: "This is a bug in the Qwenbook extension; please report it with the notebook. The plain-text version below has the same data.",
        },
        fallback,
      );
    }
  }

  /** Renders `bundle`, reusing what an earlier call built where it can. */
  protected abstract draw(bundle: BundleMimeTypes[M]): void | Promise<void>;

  private showProblem(problem: BundleProblem, fallback: string | undefined): void {
    this.body.hidden = true;
    this.problemHost.hidden = false;
    replaceChildren(this.problemHost, errorBox({ ...problem, fallback }));
  }

  private showBody(): void {
    this.body.hidden = false;
    if (!this.problemHost.hidden) {
      this.problemHost.hidden = true;
      replaceChildren(this.problemHost);
    }
  }
}

function plainText(value: unknown): string | undefined {
  if (typeof value === "string") return value;
  if (Array.isArray(value) && value.every((v) => typeof v === "string")) return value.join("");
  return undefined;
}
