import type { IRenderMime } from "@jupyterlab/rendermime-interfaces";
import type { ChatBundle, ChatMessage, ChatStats } from "./bundles.gen";
import { h, replaceChildren } from "./dom";
import { errorBox } from "./error-box";
import { formatInt, formatMs, formatRate } from "./format";
import { renderMarkdown } from "./markdown";
import { CHAT_MIME } from "./mime";
import { BundleWidget } from "./widget";

const ROLE_LABEL: Record<ChatMessage["role"], string> = { system: "System", user: "User", assistant: "Assistant" };
const THINK_OPEN = "<think>";
const THINK_CLOSE = "</think>";

interface RenderedMessage {
  role: ChatMessage["role"];
  content: string;
  el: HTMLElement;
  body: HTMLElement;
}

/** A chat transcript that streams: only the bubbles whose text changed are rebuilt on each update. */
export class ChatWidget extends BundleWidget<typeof CHAT_MIME> {
  private readonly root = h("div", { class: "qwenbook-chat" });
  private readonly header = h("div", { class: "qwenbook-chat-header" });
  /** A conversation's earlier turns, folded by default: each cell of a conversation shows its own turn. */
  private readonly earlier = h("details", { class: "qwenbook-chat-earlier", hidden: true });
  private readonly list = h("div", { class: "qwenbook-chat-messages" });
  private readonly problem = h("div", { class: "qwenbook-chat-problem" });
  private readonly footer = h("div", { class: "qwenbook-chat-footer" });
  private rendered: RenderedMessage[] = [];
  /** The earlier messages drawn, as JSON: streaming updates repeat them, and redrawing would close the fold. */
  private earlierDrawn = "[]";

  constructor() {
    super(CHAT_MIME);
    this.root.append(this.header, this.earlier, this.list, this.problem, this.footer);
    this.body.append(this.root);
  }

  protected draw(bundle: ChatBundle): void {
    this.root.dataset.state = bundle.state;
    this.drawHeader(bundle);
    this.drawEarlier(bundle.earlier ?? []);
    this.drawMessages(bundle.messages);
    this.drawCaret(bundle);
    replaceChildren(
      this.problem,
      bundle.state === "error"
        ? errorBox({
            title: bundle.error ? `${bundle.error.name}: generation failed` : "Generation failed",
            detail: bundle.error?.message ?? "The worker reported an error without a message.",
            hint: bundle.error?.hint,
          })
        : null,
    );
    this.drawFooter(bundle);
  }

  private drawHeader(bundle: ChatBundle): void {
    const badge =
      bundle.state === "generating"
        ? h("span", { class: "qwenbook-badge qwenbook-badge-live" }, "generating…")
        : bundle.state === "cancelled"
          ? h("span", { class: "qwenbook-badge qwenbook-badge-warn" }, "cancelled")
          : bundle.state === "error"
            ? h("span", { class: "qwenbook-badge qwenbook-badge-error" }, "error")
            : null;
    replaceChildren(this.header, bundle.model ? h("span", { class: "qwenbook-chat-model" }, bundle.model) : null, badge);
    this.header.hidden = !bundle.model && !badge;
  }

  private drawEarlier(messages: ChatMessage[]): void {
    const key = JSON.stringify(messages.map((m) => [m.role, m.content]));
    if (key === this.earlierDrawn) return;
    this.earlierDrawn = key;
    // <details> keeps the open state across updates and opens with Enter or Space on its summary.
    replaceChildren(
      this.earlier,
      h("summary", { class: "qwenbook-chat-earlier-label" }, earlierLabel(messages)),
      h("div", { class: "qwenbook-chat-messages" }, ...messages.map((m) => renderMessage(m).el)),
    );
    this.earlier.hidden = messages.length === 0;
  }

  private drawMessages(messages: ChatMessage[]): void {
    messages.forEach((message, i) => {
      const old = this.rendered[i];
      if (old && old.role === message.role && old.content === message.content) return;
      const fresh = renderMessage(message);
      if (old) old.el.replaceWith(fresh.el);
      else this.list.append(fresh.el);
      this.rendered[i] = fresh;
    });
    for (const extra of this.rendered.splice(messages.length)) extra.el.remove();
  }

  private drawCaret(bundle: ChatBundle): void {
    this.list.querySelector(".qwenbook-caret")?.remove();
    const last = this.rendered[this.rendered.length - 1];
    if (bundle.state !== "generating" || !last || last.role !== "assistant") return;
    const caret = h("span", { class: "qwenbook-caret", "aria-hidden": "true" });
    const blocks = last.body.querySelectorAll("p, li, pre code, .qwenbook-md-heading, td, .qwenbook-think-body");
    (blocks[blocks.length - 1] ?? last.body).append(caret);
  }

  private drawFooter(bundle: ChatBundle): void {
    const parts = footerParts(bundle.state, bundle.stats);
    replaceChildren(this.footer, ...parts);
    this.footer.hidden = parts.length === 0;
  }
}

/** "2 earlier turns", a turn being a user message and its reply (a system prompt alone: "1 earlier message"). */
export function earlierLabel(messages: readonly ChatMessage[]): string {
  const turns = messages.filter((m) => m.role === "user").length;
  if (turns > 0) return `${turns} earlier ${turns === 1 ? "turn" : "turns"}`;
  return `${messages.length} earlier ${messages.length === 1 ? "message" : "messages"}`;
}

function renderMessage(message: ChatMessage): RenderedMessage {
  const body = h("div", { class: "qwenbook-msg-body" });
  if (message.role === "assistant") body.append(renderAssistant(message.content));
  else body.textContent = message.content;
  const el = h(
    "div",
    { class: `qwenbook-msg qwenbook-msg-${message.role}` },
    h("div", { class: "qwenbook-msg-role" }, ROLE_LABEL[message.role]),
    body,
  );
  return { role: message.role, content: message.content, el, body };
}

/** Qwen3-style replies open with a <think> block; it is shown folded away from the answer. */
function renderAssistant(content: string): DocumentFragment {
  const fragment = document.createDocumentFragment();
  const trimmed = content.trimStart();
  if (!trimmed.startsWith(THINK_OPEN)) {
    fragment.append(renderMarkdown(content));
    return fragment;
  }
  const rest = trimmed.slice(THINK_OPEN.length);
  const close = rest.indexOf(THINK_CLOSE);
  const thinking = (close === -1 ? rest : rest.slice(0, close)).trim();
  const answer = close === -1 ? "" : rest.slice(close + THINK_CLOSE.length);
  const details = h(
    "details",
    { class: "qwenbook-think", open: close === -1 },
    h("summary", {}, close === -1 ? "Thinking…" : "Thought"),
    h("div", { class: "qwenbook-think-body" }, thinking),
  );
  fragment.append(details, renderMarkdown(answer));
  return fragment;
}

function footerParts(state: ChatBundle["state"], stats: ChatStats | undefined): HTMLElement[] {
  const parts: HTMLElement[] = [];
  const item = (cls: string, text: string) => parts.push(h("span", { class: cls }, text));
  if (stats) {
    const n = stats.completionTokens;
    const noun = `${formatInt(n)} token${n === 1 ? "" : "s"}`;
    item("qwenbook-chat-tokens", state === "cancelled" ? `${noun} kept` : noun);
  }
  if (state === "generating" || !stats) return parts;
  if (stats.tokensPerSecond !== undefined) item("qwenbook-chat-rate", `${formatRate(stats.tokensPerSecond)} tokens/s`);
  if (stats.ttftMs !== undefined) item("qwenbook-chat-ttft", `first token ${formatMs(stats.ttftMs)}`);
  if (stats.durationMs !== undefined) item("qwenbook-chat-duration", `${formatMs(stats.durationMs)} total`);
  if (state === "done" && stats.finishReason === "length") item("qwenbook-chat-note", "stopped at the maxTokens limit");
  if (state === "done" && stats.finishReason === "stop_string") item("qwenbook-chat-note", "stopped at a stop string");
  return parts;
}

export const chatRendererFactory: IRenderMime.IRendererFactory = {
  safe: true,
  mimeTypes: [CHAT_MIME],
  defaultRank: 10,
  createRenderer: () => new ChatWidget(),
};
