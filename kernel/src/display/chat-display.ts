// A chat reply drawn as the chat widget while it streams: one output, shown when the request goes
// out and then updated in place (throttled) as tokens arrive, ending in done, cancelled or error.
import { randomUUID } from "node:crypto";
import { chatBundle, type ChatBundle, type ChatView, type ErrorInfo } from "./bundles";
import type { DisplaySink } from "./sink";
import { createThrottle, type ThrottleOptions } from "./throttle";

export type ChatMessageView = ChatBundle["messages"][number];
export type ChatStatsView = NonNullable<ChatBundle["stats"]>;

/** What the widget opens with: the messages sent, and the model answering them. */
export interface ChatOpening {
  model?: string;
  /** The messages of this turn, drawn in full; the reply follows them. */
  messages: readonly ChatMessageView[];
  /** A conversation's messages from before this turn, drawn folded behind an "N earlier turns" marker. */
  earlier?: readonly ChatMessageView[];
}

/** The finished reply's parts beside its answer text. */
export interface ReplyParts {
  reasoning?: string;
  reasoningTokens?: number;
  reasoningMs?: number;
  toolCalls?: readonly ToolCallView[];
}

export type ToolCallView = NonNullable<ChatMessageView["toolCalls"]>[number];

export interface ChatDisplay {
  /** The display id of the widget's output. */
  readonly id: string;
  /** Adds a piece of the reply; `tokens` is how many tokens the reply has so far. */
  append(piece: string, tokens: number): void;
  /** Adds a piece of the reasoning (drawn in the Thinking block, before the answer). */
  reason(piece: string, tokens: number): void;
  /** Adds a tool call the model has written whole (drawn as a card). */
  toolCall(call: ToolCallView): void;
  /** Shows the final reply and its statistics. */
  end(state: "done" | "cancelled", text: string, stats: ChatStatsView, parts?: ReplyParts): void;
  /** Shows the reply so far with the error that stopped it. */
  fail(error: ErrorInfo): void;
}

/** Shows the chat widget in the "generating" state at once and returns its handle. */
export function startChatDisplay(sink: DisplaySink, opening: ChatOpening, options: ThrottleOptions = {}): ChatDisplay {
  const id = randomUUID();
  const head = opening.messages.map(messageView);
  const earlier = (opening.earlier ?? []).map(messageView);
  const base = {
    ...(opening.model === undefined ? {} : { model: opening.model }),
    ...(earlier.length === 0 ? {} : { earlier }),
  };
  let text = "";
  let tokens = 0;
  let parts: ReplyParts = {};
  const view = (state: ChatView["state"], stats: ChatStatsView, error?: ErrorInfo): ChatView => ({
    ...base,
    state,
    messages: [...head, messageView({ role: "assistant", content: text, ...parts })],
    stats,
    ...(error ? { error } : {}),
  });
  sink.display(chatBundle(view("generating", { completionTokens: 0 })), { id });
  const updates = createThrottle((v: ChatView) => sink.display(chatBundle(v), { id, update: true }), options);
  const grew = (tokensSoFar: number) => {
    tokens = Math.max(tokens, tokensSoFar);
    updates.push(view("generating", { completionTokens: tokens }));
  };
  return {
    id,
    append(piece, tokensSoFar) {
      text += piece;
      grew(tokensSoFar);
    },
    reason(piece, tokensSoFar) {
      parts = { ...parts, reasoning: (parts.reasoning ?? "") + piece };
      grew(tokensSoFar);
    },
    toolCall(call) {
      parts = { ...parts, toolCalls: [...(parts.toolCalls ?? []), call] };
      grew(tokens);
    },
    end(state, finalText, stats, final) {
      text = finalText;
      if (final) parts = { ...final };
      updates.finish(view(state, stats));
    },
    fail(error) {
      updates.finish(view("error", { completionTokens: tokens }, error));
    },
  };
}

/** A message as the widget draws it: empty parts left out, tool calls as name and arguments. */
function messageView(m: Omit<ChatMessageView, "toolCalls"> & { toolCalls?: readonly ToolCallView[] }): ChatMessageView {
  const out: ChatMessageView = { role: m.role, content: m.content };
  if (m.reasoning) {
    out.reasoning = m.reasoning;
    if (m.reasoningTokens) out.reasoningTokens = m.reasoningTokens;
    if (m.reasoningMs) out.reasoningMs = m.reasoningMs;
  }
  if (m.toolCalls?.length) out.toolCalls = m.toolCalls.map((c) => ({ name: c.name, arguments: c.arguments }));
  if (m.name !== undefined) out.name = m.name;
  return out;
}
