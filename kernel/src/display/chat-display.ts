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

export interface ChatDisplay {
  /** The display id of the widget's output. */
  readonly id: string;
  /** Adds a piece of the reply; `tokens` is how many tokens the reply has so far. */
  append(piece: string, tokens: number): void;
  /** Shows the final reply and its statistics. */
  end(state: "done" | "cancelled", text: string, stats: ChatStatsView): void;
  /** Shows the reply so far with the error that stopped it. */
  fail(error: ErrorInfo): void;
}

/** Shows the chat widget in the "generating" state at once and returns its handle. */
export function startChatDisplay(sink: DisplaySink, opening: ChatOpening, options: ThrottleOptions = {}): ChatDisplay {
  const id = randomUUID();
  const head = opening.messages.map((m) => ({ role: m.role, content: m.content }));
  const earlier = (opening.earlier ?? []).map((m) => ({ role: m.role, content: m.content }));
  const base = {
    ...(opening.model === undefined ? {} : { model: opening.model }),
    ...(earlier.length === 0 ? {} : { earlier }),
  };
  const view = (state: ChatView["state"], text: string, stats: ChatStatsView, error?: ErrorInfo): ChatView => ({
    ...base,
    state,
    messages: [...head, { role: "assistant", content: text }],
    stats,
    ...(error ? { error } : {}),
  });
  sink.display(chatBundle(view("generating", "", { completionTokens: 0 })), { id });
  const updates = createThrottle((v: ChatView) => sink.display(chatBundle(v), { id, update: true }), options);
  let text = "";
  let tokens = 0;
  return {
    id,
    append(piece, tokensSoFar) {
      text += piece;
      tokens = Math.max(tokens, tokensSoFar);
      updates.push(view("generating", text, { completionTokens: tokens }));
    },
    end(state, finalText, stats) {
      text = finalText;
      updates.finish(view(state, finalText, stats));
    },
    fail(error) {
      updates.finish(view("error", text, { completionTokens: tokens }, error));
    },
  };
}
