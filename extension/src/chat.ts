import type { IRenderMime } from "@jupyterlab/rendermime-interfaces";
import type { ChatBundle, ChatMessage, ChatStats, ChatToolCall } from "./bundles.gen";
import { h, replaceChildren } from "./dom";
import { errorBox } from "./error-box";
import { formatDuration, formatInt, formatMs, formatRate } from "./format";
import { renderMarkdown } from "./markdown";
import { CHAT_MIME } from "./mime";
import { BundleWidget } from "./widget";

const ROLE_LABEL: Record<ChatMessage["role"], string> = {
  system: "System",
  user: "User",
  assistant: "Assistant",
  tool: "Tool result",
};
const THINK_OPEN = "<think>";
const THINK_CLOSE = "</think>";

interface RenderedMessage {
  /** What the bubble was drawn from (the message and whether its thinking was live): equal keys, same drawing. */
  key: string;
  el: HTMLElement;
  body: HTMLElement;
}

/** How a bubble's Thinking block opens: live thinking opens it unless the reader chose otherwise. */
interface ThinkFold {
  /** The reply is still thinking (generating, no answer or call yet). */
  live: boolean;
  /** The reader's own open/closed choice for this bubble, which every redraw keeps. */
  chosen?: boolean;
  /** Called with the new state when the reader opens or closes the block. */
  onChoose?: (open: boolean) => void;
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
  /** The reader's open/closed choice for each new-turn bubble's Thinking block, by message index. */
  private readonly thinkChoices = new Map<number, boolean>();
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
    this.drawMessages(bundle.messages, bundle.state);
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
    const key = JSON.stringify(messages);
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

  private drawMessages(messages: ChatMessage[], state: ChatBundle["state"]): void {
    messages.forEach((message, i) => {
      const old = this.rendered[i];
      const live = state === "generating" && i === messages.length - 1 && isThinking(message);
      const fold: ThinkFold = { live, chosen: this.thinkChoices.get(i), onChoose: (open) => this.thinkChoices.set(i, open) };
      if (old && old.key === messageKey(message, live)) return;
      const fresh = renderMessage(message, fold);
      if (old) old.el.replaceWith(fresh.el);
      else this.list.append(fresh.el);
      this.rendered[i] = fresh;
    });
    for (const extra of this.rendered.splice(messages.length)) extra.el.remove();
    for (const i of [...this.thinkChoices.keys()]) if (i >= messages.length) this.thinkChoices.delete(i);
  }

  private drawCaret(bundle: ChatBundle): void {
    this.list.querySelector(".qwenbook-caret")?.remove();
    const last = this.rendered[this.rendered.length - 1];
    if (bundle.state !== "generating" || !last || !last.el.classList.contains("qwenbook-msg-assistant")) return;
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

/** Whether an assistant message is still in its thinking: reasoning so far, no answer and no call yet. */
function isThinking(m: ChatMessage): boolean {
  return m.role === "assistant" && !!m.reasoning && !m.content && !m.toolCalls?.length;
}

function messageKey(message: ChatMessage, live: boolean): string {
  return JSON.stringify([message, live]);
}

function renderMessage(message: ChatMessage, fold: ThinkFold = { live: false }): RenderedMessage {
  const key = messageKey(message, fold.live);
  const body = h("div", { class: "qwenbook-msg-body" });
  if (message.role === "assistant") body.append(renderAssistant(message, fold));
  else if (message.role === "tool") body.append(renderToolResult(message.content));
  else body.textContent = message.content;
  const label = message.role === "tool" && message.name ? `${ROLE_LABEL.tool} · ${message.name}` : ROLE_LABEL[message.role];
  const el = h(
    "div",
    { class: `qwenbook-msg qwenbook-msg-${message.role}` },
    h("div", { class: "qwenbook-msg-role" }, label),
    body,
  );
  return { key, el, body };
}

/** The thinking (folded once the answer starts), the answer as Markdown, then one card per tool call. */
function renderAssistant(message: ChatMessage, fold: ThinkFold): DocumentFragment {
  const fragment = document.createDocumentFragment();
  if (message.reasoning) {
    fragment.append(thinkBlock(message.reasoning, fold.chosen ?? fold.live, thoughtLabel(message, fold.live), fold));
    fragment.append(renderMarkdown(message.content));
  } else {
    fragment.append(renderInlineThink(message.content, fold));
  }
  const calls = message.toolCalls ?? [];
  if (calls.length > 0) fragment.append(h("div", { class: "qwenbook-tool-calls" }, ...calls.map(toolCallCard)));
  return fragment;
}

/** "Thinking…" while it streams; after: "Thought for 1.2 s · 85 tokens", each figure only when known. */
export function thoughtLabel(m: Pick<ChatMessage, "reasoningMs" | "reasoningTokens">, live: boolean): string {
  if (live) return "Thinking…";
  const parts = [m.reasoningMs ? `Thought for ${m.reasoningMs < 1000 ? formatMs(m.reasoningMs) : formatDuration(m.reasoningMs / 1000)}` : "Thought"];
  if (m.reasoningTokens) parts.push(`${formatInt(m.reasoningTokens)} token${m.reasoningTokens === 1 ? "" : "s"}`);
  return parts.join(" · ");
}

/** A <details> block (keyboard-operable, keeps its state between updates) that reports the reader's toggles. */
function thinkBlock(thinking: string, open: boolean, label: string, fold: ThinkFold): HTMLDetailsElement {
  const summary = h("summary", { class: "qwenbook-think-label" }, label);
  const details = h("details", { class: "qwenbook-think", open }, summary, h("div", { class: "qwenbook-think-body" }, thinking));
  // A click on the summary (Enter and Space on it are clicks too) flips the block after this handler runs.
  summary.addEventListener("click", () => fold.onChoose?.(!details.open));
  return details;
}

/** Replies whose text still holds a <think> block (bundles from before reasoning had its own field). */
function renderInlineThink(content: string, fold: ThinkFold): DocumentFragment {
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
  fragment.append(thinkBlock(thinking, fold.chosen ?? close === -1, close === -1 ? "Thinking…" : "Thought", fold));
  fragment.append(renderMarkdown(answer));
  return fragment;
}

/** A call the model made: the tool's name over its arguments as indented JSON. */
function toolCallCard(call: ChatToolCall): HTMLElement {
  return h(
    "div",
    { class: "qwenbook-tool-call" },
    h(
      "div",
      { class: "qwenbook-tool-call-head" },
      h("span", { class: "qwenbook-tool-call-kind" }, "Calls"),
      h("span", { class: "qwenbook-tool-call-name" }, call.name),
    ),
    h("pre", { class: "qwenbook-tool-call-args" }, JSON.stringify(call.arguments, null, 2)),
  );
}

/** A tool's result: JSON indented when it is JSON, otherwise the text as sent. */
function renderToolResult(content: string): HTMLElement {
  return h("pre", { class: "qwenbook-tool-result" }, prettyJson(content) ?? content);
}

function prettyJson(text: string): string | null {
  const t = text.trim();
  if (!t.startsWith("{") && !t.startsWith("[")) return null;
  try {
    return JSON.stringify(JSON.parse(t), null, 2);
  } catch {
    return null;
  }
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
