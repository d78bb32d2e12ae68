import { inspect } from "node:util";
import { startChatDisplay, type ChatDisplay, type ChatOpening } from "../display/chat-display";
import { errorInfo } from "../display/error-info";
import { markShown } from "../display/shown";
import { currentSink, type DisplaySink } from "../display/sink";
import type { Reply } from "./reply";
import { checkTools } from "./tools";
import type { ToolCall, ToolSpec } from "./types";
import { expectBoolean, expectInteger, expectNumber, expectPrompt, expectString } from "./validate";

/** Generation settings a chat builder collects; unset ones take the worker's defaults. */
export interface ChatSettings {
  system?: string;
  maxTokens?: number;
  temperature?: number;
  topP?: number;
  topK?: number;
  minP?: number;
  greedy?: boolean;
  stop?: readonly string[];
  seed?: number;
  /** Qwen3's thinking switch (the template's enable_thinking); unset: the template's default. */
  thinking?: boolean;
  /** Tools the model may call. */
  tools?: readonly ToolSpec[];
  /** Do not stream the reply into the cell while awaiting. */
  quiet?: boolean;
}

/** How a running generation reports text and learns it should stop. */
export interface ChatIO {
  /** Called once, as the request goes out, with the messages sent and the model's id. */
  onStart?: (opening: ChatOpening) => void;
  /** Each piece of the reply, with the number of tokens generated so far when known. */
  onText?: (piece: string, tokens?: number) => void;
  /** Each piece of the model's reasoning (Qwen3 thinking), before the answer's pieces. */
  onReasoning?: (piece: string, tokens?: number) => void;
  /** Each tool call as soon as the model has written it whole. */
  onToolCall?: (call: ToolCall) => void;
  signal?: AbortSignal;
}

/** What a chat builder runs against: a model, or a conversation that keeps history. */
export interface ChatTarget {
  /** Shown in the builder's toString(). */
  readonly label: string;
  /** Where an awaited reply streams; default: the kernel's output, else stdout. */
  readonly sink?: () => DisplaySink;
  /** How the call that takes the prompt is named in errors; default "chat(prompt)". */
  readonly promptName?: string;
  run(prompt: string, settings: Readonly<ChatSettings>, io: ChatIO): Promise<Reply>;
}

const MAX_STOP_STRINGS = 16;

/**
 * A chat request being put together. Each option returns a new builder (so a configured one can
 * be reused), checks its value at once, and nothing is sent until the builder is awaited or
 * streamed. Awaiting streams the reply into the cell and resolves to a {@link Reply}.
 */
export class ChatRequest implements PromiseLike<Reply> {
  readonly #target: ChatTarget;
  readonly #prompt: string;
  readonly #settings: Readonly<ChatSettings>;
  #run: Promise<Reply> | undefined;
  #stream: ChatStream | undefined;

  constructor(target: ChatTarget, prompt: string, settings: Readonly<ChatSettings> = {}) {
    this.#target = target;
    const name = target.promptName ?? "chat(prompt)";
    const example = name.startsWith("say(") ? 'talk.say("And in French?")' : 'm.chat("What is LoRA?")';
    this.#prompt = expectPrompt(name, prompt, example);
    this.#settings = settings;
  }

  /** The settings this builder will send. */
  get settings(): Readonly<ChatSettings> {
    return this.#settings;
  }

  get prompt(): string {
    return this.#prompt;
  }

  #with(patch: ChatSettings): ChatRequest {
    return new ChatRequest(this.#target, this.#prompt, { ...this.#settings, ...patch });
  }

  /** System prompt for this request. */
  system(text: string): ChatRequest {
    return this.#with({ system: expectString("system(text)", text) });
  }

  /** Most tokens to generate (at least 1). */
  maxTokens(n: number): ChatRequest {
    return this.#with({ maxTokens: expectInteger("maxTokens(n)", n, { min: 1 }) });
  }

  /** Sampling temperature, 0 or more; 0 behaves like greedy decoding. */
  temperature(t: number): ChatRequest {
    return this.#with({ temperature: expectNumber("temperature(t)", t, { min: 0 }) });
  }

  /** Nucleus sampling: keep the smallest set of tokens whose probability reaches p, 0 < p <= 1. */
  topP(p: number): ChatRequest {
    return this.#with({ topP: expectNumber("topP(p)", p, { above: 0, max: 1 }) });
  }

  /** Sample among the k most likely tokens; 0 turns the limit off. */
  topK(k: number): ChatRequest {
    return this.#with({ topK: expectInteger("topK(k)", k, { min: 0 }) });
  }

  /** Min-p sampling: drop tokens less likely than p times the most likely one, 0 <= p <= 1; 0 turns it off. */
  minP(p: number): ChatRequest {
    return this.#with({ minP: expectNumber("minP(p)", p, { min: 0, max: 1 }) });
  }

  /** Always take the most likely token (deterministic). */
  greedy(on = true): ChatRequest {
    return this.#with({ greedy: expectBoolean("greedy(on)", on) });
  }

  /** Stop when the text contains any of these strings (they are not included in the reply). */
  stop(...strings: string[]): ChatRequest {
    const list = strings.flat();
    list.forEach((s, i) => expectString(`stop(...strings)[${i}]`, s, { nonEmpty: true }));
    const merged = [...(this.#settings.stop ?? []), ...list];
    if (merged.length > MAX_STOP_STRINGS) {
      throw new RangeError(`stop() takes at most ${MAX_STOP_STRINGS} strings in all, got ${merged.length}`);
    }
    return this.#with({ stop: merged });
  }

  /** Seed for sampling, so a sampled reply can be reproduced. */
  seed(n: number): ChatRequest {
    return this.#with({ seed: expectInteger("seed(n)", n, { min: 0 }) });
  }

  /**
   * Qwen3's thinking switch: `true` lets the model reason first (shown apart, as `reply.reasoning`), `false`
   * makes it answer at once. Unset: the model's template decides (Qwen3 thinks by default).
   */
  thinking(on = true): ChatRequest {
    return this.#with({ thinking: expectBoolean("thinking(on)", on) });
  }

  /**
   * Tools the model may call, each `{ name, description, parameters }` with `parameters` a JSON Schema
   * object. The reply's calls come back parsed in `reply.toolCalls`.
   */
  tools(list: readonly ToolSpec[]): ChatRequest {
    return this.#with({ tools: checkTools("tools(list)", list) });
  }

  /** Await without streaming the reply into the output. */
  quiet(on = true): ChatRequest {
    return this.#with({ quiet: expectBoolean("quiet(on)", on) });
  }

  /**
   * The reply's text pieces as they are generated, for program use; nothing is printed. One
   * builder is one generation: awaiting the builder afterwards gives this stream's reply.
   */
  stream(): ChatStream {
    if (this.#run && !this.#stream) {
      throw new Error("This chat request is already running (it was awaited); call .stream() on a new m.chat(...)");
    }
    this.#stream ??= new ChatStream((io) => this.#target.run(this.#prompt, this.#settings, io));
    return this.#stream;
  }

  then<A = Reply, B = never>(
    onFulfilled?: ((reply: Reply) => A | PromiseLike<A>) | null,
    onRejected?: ((reason: unknown) => B | PromiseLike<B>) | null,
  ): Promise<A | B> {
    this.#run ??= this.#stream ? this.#stream.reply : this.#start();
    return this.#run.then(onFulfilled, onRejected);
  }

  catch<B = never>(onRejected?: ((reason: unknown) => B | PromiseLike<B>) | null): Promise<Reply | B> {
    return this.then(undefined, onRejected);
  }

  finally(onFinally?: (() => void) | null): Promise<Reply> {
    return this.then().finally(onFinally);
  }

  async #start(): Promise<Reply> {
    if (this.#settings.quiet) return this.#target.run(this.#prompt, this.#settings, {});
    const base = this.#target.sink?.() ?? currentSink();
    // Pieces can still arrive after an interrupt has ended the cell; they belong to this cell.
    const sink = base.pin?.() ?? base;
    return sink.rich ? this.#startWidget(sink) : this.#startText(sink);
  }

  /** In a notebook: the chat widget, updated in place as the reply streams. */
  async #startWidget(sink: DisplaySink): Promise<Reply> {
    let live: ChatDisplay | undefined;
    // A target that does not announce its request still gets a widget, holding the prompt alone.
    const open = (opening: ChatOpening = { messages: [{ role: "user", content: this.#prompt }] }) =>
      (live ??= startChatDisplay(sink, opening));
    let tokens = 0;
    let reply: Reply;
    try {
      reply = await this.#target.run(this.#prompt, this.#settings, {
        onStart: (opening) => void open(opening),
        onText: (piece, n) => {
          tokens = n ?? tokens + 1;
          open().append(piece, tokens);
        },
        onReasoning: (piece, n) => {
          tokens = n ?? tokens + 1;
          open().reason(piece, tokens);
        },
        onToolCall: (call) => open().toolCall({ name: call.name, arguments: call.arguments }),
      });
    } catch (error) {
      live?.fail(errorInfo(error));
      // The bubble shows the error; the kernel then does not print it a second time.
      throw live ? markShown(error) : error;
    }
    open().end(reply.cancelled ? "cancelled" : "done", reply.text, {
      completionTokens: reply.completionTokens,
      promptTokens: reply.promptTokens,
      ttftMs: reply.ttftMs,
      durationMs: reply.durationMs,
      tokensPerSecond: reply.tokensPerSecond,
      finishReason: reply.finishReason,
    }, {
      reasoning: reply.reasoning,
      reasoningTokens: reply.reasoningTokens,
      reasoningMs: reply.reasoningMs,
      toolCalls: reply.readableToolCalls.map((c) => ({ name: c.name, arguments: c.arguments })),
    });
    return markShown(reply);
  }

  /** In a terminal: the reply's text as it streams, then a newline (and a note when cancelled). */
  async #startText(sink: DisplaySink): Promise<Reply> {
    let last = "";
    let thinking = false;
    const show = (piece: string) => {
      if (piece === "") return;
      last = piece;
      sink.text(piece);
    };
    // Reasoning streams between [thinking] and [/thinking] lines, so a terminal shows where the answer starts.
    const endThinking = () => {
      if (!thinking) return;
      thinking = false;
      show(`${last.endsWith("\n") ? "" : "\n"}[/thinking]\n`);
    };
    const reply = await this.#target.run(this.#prompt, this.#settings, {
      onReasoning: (piece) => {
        if (!thinking && piece) show("[thinking]\n");
        thinking ||= piece !== "";
        show(piece);
      },
      onText: (piece) => {
        if (piece) endThinking();
        show(piece);
      },
      onToolCall: (call) => {
        endThinking();
        show(`${last === "" || last.endsWith("\n") ? "" : "\n"}[tool call] ${call.name}(${JSON.stringify(call.arguments)})\n`);
      },
    });
    endThinking();
    // The kernel prints the awaited value on the next line; end the streamed text first.
    let tail = last === "" || last.endsWith("\n") ? "" : "\n";
    if (reply.cancelled) tail += `[cancelled after ${reply.completionTokens} tokens]\n`;
    if (tail) sink.text(tail);
    return reply;
  }

  toString(): string {
    const parts = [this.#target.label, JSON.stringify(this.#prompt.length > 60 ? this.#prompt.slice(0, 60) + "…" : this.#prompt)];
    for (const [key, value] of Object.entries(this.#settings)) {
      if (value === undefined) continue;
      if (value === true) parts.push(key);
      else if (typeof value === "string") parts.push(`${key}: ${JSON.stringify(value.length > 40 ? value.slice(0, 40) + "…" : value)}`);
      else parts.push(`${key}: ${JSON.stringify(value)}`);
    }
    return `chat(${parts.join(", ")})`;
  }
}

Object.defineProperty(ChatRequest.prototype, inspect.custom, {
  value(this: ChatRequest): string {
    return this.toString();
  },
});

/**
 * Text pieces of one generation, as an async iterable. Leaving the loop early (break, return,
 * an exception) cancels the generation on the worker. `reply` resolves to the full Reply once
 * the generation is over.
 */
export class ChatStream implements AsyncIterable<string> {
  readonly #start: (io: ChatIO) => Promise<Reply>;
  #reply: Promise<Reply> | undefined;
  #iterating = false;

  constructor(start: (io: ChatIO) => Promise<Reply>) {
    this.#start = start;
  }

  /** The finished reply; starts the generation if iteration has not. */
  get reply(): Promise<Reply> {
    if (!this.#reply) {
      // Consume the pieces ourselves so `await s.reply` alone also works.
      this.#reply = this.#start({});
    }
    return this.#reply;
  }

  [Symbol.asyncIterator](): AsyncIterator<string> {
    if (this.#iterating || this.#reply) throw new Error("A chat stream can be iterated once; call .stream() again for another generation");
    this.#iterating = true;
    const queue: string[] = [];
    let finished = false;
    let failure: { error: unknown } | null = null;
    let wake: (() => void) | null = null;
    const abort = new AbortController();
    const notify = (): void => {
      wake?.();
      wake = null;
    };
    this.#reply = this.#start({
      onText: (piece) => {
        if (piece === "") return;
        queue.push(piece);
        notify();
      },
      signal: abort.signal,
    });
    this.#reply.then(
      () => {
        finished = true;
        notify();
      },
      (error: unknown) => {
        failure = { error };
        finished = true;
        notify();
      },
    );
    const reply = this.#reply;
    return {
      async next(): Promise<IteratorResult<string>> {
        for (;;) {
          if (queue.length > 0) return { value: queue.shift()!, done: false };
          if (failure) throw failure.error;
          if (finished) return { value: undefined, done: true };
          await new Promise<void>((r) => (wake = r));
        }
      },
      async return(): Promise<IteratorResult<string>> {
        if (!finished) {
          abort.abort();
          await reply.catch(() => undefined);
        }
        return { value: undefined, done: true };
      },
    };
  }
}
