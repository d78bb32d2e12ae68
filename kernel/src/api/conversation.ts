import { inspect } from "node:util";
import type { DisplaySink } from "../display/sink";
import { ChatRequest, type ChatIO, type ChatSettings, type ChatTarget } from "./chat";
import type { Reply } from "./reply";
import type { ChatMessage } from "./types";
import { expectString } from "./validate";

/**
 * A tool's result, given back to the model with `conversation.say(result)` after it called the tool.
 * `content` is text, or any JSON value (sent as its JSON text).
 */
export interface ToolResult {
  role: "tool";
  content: unknown;
  /** The call it answers (`reply.toolCalls[i].id`); optional, Qwen's templates go by order. */
  toolCallId?: string;
  /** The tool's name. */
  name?: string;
}

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
  /** User, assistant and tool messages, oldest first. */
  readonly #turns: ChatMessage[] = [];
  #says = 0;
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

  /**
   * Adds a user message and asks for the reply; chain options as on `model.chat()`. After the model
   * called tools, say() their results instead (`{ role: "tool", content }`, one or a list) and the model
   * continues from them; chain `.tools(...)` again so it may call more.
   */
  say(input: string | ToolResult | readonly ToolResult[]): ChatRequest {
    const results = typeof input === "string" ? undefined : toolMessages(input);
    const target: ChatTarget = {
      label: `${this.#model.id}, turn ${this.#says + 1}`,
      sink: this.#model.sink,
      promptName: "say(text)",
      run: (prompt, settings, io) => this.#turn(results ?? [{ role: "user", content: prompt }], settings, io),
    };
    // A builder needs a prompt to show; tool results show as what they say.
    return new ChatRequest(target, results ? results.map((m) => m.content).join("\n") || "(empty tool result)" : (input as string));
  }

  /** Forgets every turn (the system prompt stays). */
  clear(): void {
    this.#turns.length = 0;
    this.#says = 0;
  }

  #messagesWith(system: string | undefined): ChatMessage[] {
    const out: ChatMessage[] = system === undefined ? [] : [{ role: "system", content: system }];
    return out.concat(this.#turns.map((m) => ({ ...m })));
  }

  async #turn(said: ChatMessage[], settings: Readonly<ChatSettings>, io: ChatIO): Promise<Reply> {
    if (this.#busy) {
      throw new Error("This conversation is still answering the previous message; await that say() before the next one");
    }
    this.#busy = true;
    try {
      // A .system() on this say() replaces the conversation's system prompt for this turn only.
      const system = settings.system ?? this.system;
      const messages = this.#messagesWith(system);
      messages.push(...said);
      const reply = await this.#model.generate(messages, settings, this.#showingNewTurn(io, said, system, settings.system !== undefined));
      // The answer joins the history without its reasoning, as Qwen3's template expects earlier turns; the
      // calls it made stay with it, so the tool results said next answer them.
      const answer: ChatMessage = { role: "assistant", content: reply.text };
      if (reply.readableToolCalls.length) answer.toolCalls = reply.readableToolCalls.map((c) => ({ ...c }));
      this.#turns.push(...said, answer);
      this.#says += 1;
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
  #showingNewTurn(io: ChatIO, said: ChatMessage[], system: string | undefined, ownSystem: boolean): ChatIO {
    const onStart = io.onStart;
    if (!onStart) return io;
    const earlier = this.#turns.map((m) => ({ ...m }));
    const current: ChatMessage[] = said.map((m) => ({ ...m }));
    if (system !== undefined) {
      const systemIsNew = earlier.length === 0 || (ownSystem && system !== this.system);
      (systemIsNew ? current : earlier).unshift({ role: "system", content: system });
    }
    return { ...io, onStart: (opening) => onStart({ ...opening, messages: current, earlier }) };
  }

  toString(): string {
    const turns = this.#says;
    return `Conversation(${this.#model.id}, ${turns} ${turns === 1 ? "turn" : "turns"}${this.system === undefined ? "" : ", with system prompt"})`;
  }
}

/** Tool results as tool messages, checked; content that is not text is sent as its JSON. */
function toolMessages(input: ToolResult | readonly ToolResult[]): ChatMessage[] {
  const list: readonly unknown[] = Array.isArray(input) ? input : [input];
  if (list.length === 0) throw new RangeError("say([]) got no tool results; pass a string or { role: \"tool\", content }");
  return list.map((r: unknown, i: number) => {
    const where = `say(results)[${i}]`;
    if (typeof r !== "object" || r === null || (r as { role?: unknown }).role !== "tool") {
      throw new TypeError(`${where} must be a string or { role: "tool", content } (a tool's result), got ${JSON.stringify(r)}`);
    }
    const { content, toolCallId, name } = r as ToolResult;
    if (content === undefined) throw new TypeError(`${where}.content is missing: give the tool's result (text or a JSON value)`);
    const m: ChatMessage = { role: "tool", content: typeof content === "string" ? content : JSON.stringify(content) };
    if (toolCallId !== undefined) m.toolCallId = expectString(`${where}.toolCallId`, toolCallId);
    if (name !== undefined) m.name = expectString(`${where}.name`, name);
    return m;
  });
}

Object.defineProperty(Conversation.prototype, inspect.custom, {
  value(this: Conversation): string {
    return this.toString();
  },
});
