import { inspect } from "node:util";
import type { DisplaySink } from "../display/sink";
import { ChatRequest, type ChatIO, type ChatSettings, type ChatTarget } from "./chat";
import type { Reply } from "./reply";
import type { ChatMessage } from "./types";

/** Runs a list of messages on a model; what a conversation needs from Model. */
export interface MessageRunner {
  readonly id: string;
  /** Where awaited replies stream. */
  readonly sink?: () => DisplaySink;
  generate(messages: ChatMessage[], settings: Readonly<ChatSettings>, io: ChatIO): Promise<Reply>;
}

export interface ConversationOptions {
  /** System prompt for every turn; without one the model's chat template picks its default. */
  system?: string;
}

/**
 * A multi-turn chat: each say() sends the whole history plus the new message, and the reply
 * joins the history when it arrives (also a partial one, when the turn was interrupted).
 */
export class Conversation {
  readonly #model: MessageRunner;
  /** User and assistant messages, oldest first. */
  readonly #turns: ChatMessage[] = [];
  #busy = false;
  readonly system: string | undefined;

  constructor(model: MessageRunner, options: ConversationOptions = {}) {
    this.#model = model;
    this.system = options.system;
  }

  /**
   * Every message the next say() sends before its own: the system prompt (if any), then each
   * user message and reply, oldest first. A copy: changing it does not change the conversation.
   */
  get history(): ChatMessage[] {
    return this.#messagesWith(this.system);
  }

  /** Adds a user message and asks for the reply; chain options as on `model.chat()`. */
  say(text: string): ChatRequest {
    const target: ChatTarget = {
      label: `${this.#model.id}, turn ${this.#turns.length / 2 + 1}`,
      sink: this.#model.sink,
      promptName: "say(text)",
      run: (prompt, settings, io) => this.#turn(prompt, settings, io),
    };
    return new ChatRequest(target, text);
  }

  /** Forgets every turn (the system prompt stays). */
  clear(): void {
    this.#turns.length = 0;
  }

  #messagesWith(system: string | undefined): ChatMessage[] {
    const out: ChatMessage[] = system === undefined ? [] : [{ role: "system", content: system }];
    return out.concat(this.#turns.map((m) => ({ ...m })));
  }

  async #turn(prompt: string, settings: Readonly<ChatSettings>, io: ChatIO): Promise<Reply> {
    if (this.#busy) {
      throw new Error("This conversation is still answering the previous message; await that say() before the next one");
    }
    this.#busy = true;
    try {
      // A .system() on this say() replaces the conversation's system prompt for this turn only.
      const system = settings.system ?? this.system;
      const messages = this.#messagesWith(system);
      messages.push({ role: "user", content: prompt });
      const reply = await this.#model.generate(messages, settings, this.#showingNewTurn(io, prompt, system, settings.system !== undefined));
      this.#turns.push({ role: "user", content: prompt }, { role: "assistant", content: reply.text });
      return reply;
    } finally {
      this.#busy = false;
    }
  }

  /**
   * The widget draws this turn alone, with the history sent before it folded away as `earlier`:
   * every cell of a conversation would otherwise draw all the turns before it again. The system
   * prompt shows with the first turn, and with a turn whose say() set its own; otherwise it was
   * shown before and folds away with the earlier turns.
   */
  #showingNewTurn(io: ChatIO, prompt: string, system: string | undefined, ownSystem: boolean): ChatIO {
    const onStart = io.onStart;
    if (!onStart) return io;
    const earlier = this.#turns.map((m) => ({ ...m }));
    const current: ChatMessage[] = [{ role: "user", content: prompt }];
    if (system !== undefined) {
      const systemIsNew = earlier.length === 0 || (ownSystem && system !== this.system);
      (systemIsNew ? current : earlier).unshift({ role: "system", content: system });
    }
    return { ...io, onStart: (opening) => onStart({ ...opening, messages: current, earlier }) };
  }

  toString(): string {
    const turns = this.#turns.length / 2;
    return `Conversation(${this.#model.id}, ${turns} ${turns === 1 ? "turn" : "turns"}${this.system === undefined ? "" : ", with system prompt"})`;
  }
}

Object.defineProperty(Conversation.prototype, inspect.custom, {
  value(this: Conversation): string {
    return this.toString();
  },
});
