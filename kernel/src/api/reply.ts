import { inspect } from "node:util";
import type { GenerateReply } from "../bridge/protocol.gen";
import type { FinishReason, MalformedToolCall, ToolCall } from "./types";

/** The model wrote a `<tool_call>` block that is not a call; `reply.text` keeps what it wrote. */
export class ToolCallParseError extends Error {
  readonly errors: readonly MalformedToolCall[];
  constructor(errors: readonly MalformedToolCall[]) {
    const first = errors[0];
    super(
      `the model wrote ${errors.length === 1 ? "a tool call" : `${errors.length} tool calls`} that could not be read: ` +
        `${first.error}. It wrote: ${first.text.length > 300 ? `${first.text.slice(0, 300)}...` : first.text}. ` +
        "The text is kept in reply.text and every bad block in reply.toolCallErrors; sample again (or lower the " +
        "temperature), or train the model on well-formed calls.",
    );
    this.name = "ToolCallParseError";
    this.errors = errors;
  }
}

/**
 * A finished (or cancelled) generation. `String(reply)` is its text; it inspects as a one-line
 * summary so a notebook that shows the awaited value does not print the text a second time.
 */
export class Reply {
  /** The answer (without the reasoning and tool calls). */
  readonly text: string;
  /** What the model thought before answering (Qwen3 thinking); "" when it did not. */
  readonly reasoning: string;
  /** Tokens the reasoning took, and milliseconds from the first token to its end. */
  readonly reasoningTokens: number;
  readonly reasoningMs: number;
  /** `<tool_call>` blocks that were not calls, with why; their text is in `text`. */
  readonly toolCallErrors: readonly MalformedToolCall[];
  readonly finishReason: FinishReason;
  readonly promptTokens: number;
  readonly completionTokens: number;
  /** Milliseconds from the request reaching the worker to the first token. */
  readonly ttftMs: number;
  readonly durationMs: number;
  readonly tokensPerSecond: number;
  readonly tokenIds: readonly number[];
  /** The model that wrote it. */
  readonly model: string;
  readonly #toolCalls: readonly ToolCall[];

  constructor(fields: ReplyFields) {
    this.text = fields.text;
    this.reasoning = fields.reasoning ?? "";
    this.reasoningTokens = fields.reasoningTokens ?? 0;
    this.reasoningMs = fields.reasoningMs ?? 0;
    this.toolCallErrors = fields.toolCallErrors ?? [];
    this.#toolCalls = fields.toolCalls ?? [];
    this.finishReason = fields.finishReason;
    this.promptTokens = fields.promptTokens;
    this.completionTokens = fields.completionTokens;
    this.ttftMs = fields.ttftMs;
    this.durationMs = fields.durationMs;
    this.tokensPerSecond = fields.tokensPerSecond;
    this.tokenIds = fields.tokenIds;
    this.model = fields.model;
  }

  static fromWire(reply: GenerateReply, model: string): Reply {
    const seconds = reply.duration_ms / 1000;
    return (last = new Reply({
      text: reply.text,
      reasoning: reply.reasoning ?? "",
      reasoningTokens: reply.reasoning_tokens ?? 0,
      reasoningMs: reply.reasoning_ms ?? 0,
      toolCalls: (reply.tool_calls ?? []).map((c) => ({ ...c })),
      toolCallErrors: (reply.tool_call_errors ?? []).map((e) => ({ ...e })),
      finishReason: reply.finish_reason,
      promptTokens: reply.prompt_tokens,
      completionTokens: reply.completion_tokens,
      ttftMs: reply.ttft_ms,
      durationMs: reply.duration_ms,
      tokensPerSecond: reply.tokens_per_s ?? (seconds > 0 ? reply.completion_tokens / seconds : 0),
      tokenIds: reply.token_ids ?? [],
      model,
    }));
  }

  /**
   * The tools the model called, each `{ id, name, arguments }` with the arguments parsed. Throws a
   * ToolCallParseError saying what was wrong when the model wrote a call that cannot be read.
   */
  get toolCalls(): readonly ToolCall[] {
    if (this.toolCallErrors.length) throw new ToolCallParseError(this.toolCallErrors);
    return this.#toolCalls;
  }

  /** The calls that could be read, without throwing for the others (see toolCallErrors). */
  get readableToolCalls(): readonly ToolCall[] {
    return this.#toolCalls;
  }

  /** True when an interrupt or cancel stopped it; `text` holds what was generated until then. */
  get cancelled(): boolean {
    return this.finishReason === "cancelled";
  }

  toString(): string {
    return this.text;
  }

  toJSON(): Record<string, unknown> {
    const { text, reasoning, finishReason, promptTokens, completionTokens, ttftMs, durationMs, tokensPerSecond, model } = this;
    return {
      text, ...(reasoning ? { reasoning } : {}), ...(this.#toolCalls.length ? { toolCalls: this.#toolCalls } : {}),
      ...(this.toolCallErrors.length ? { toolCallErrors: this.toolCallErrors } : {}),
      finishReason, promptTokens, completionTokens, ttftMs, durationMs, tokensPerSecond, model,
    };
  }
}

/** What a Reply is made of; a reply without reasoning or tool calls may leave those out. */
export type ReplyFields = Omit<
  Reply,
  "toString" | "toJSON" | "cancelled" | "toolCalls" | "readableToolCalls" | "reasoning" | "reasoningTokens" | "reasoningMs" | "toolCallErrors"
> &
  Partial<Pick<Reply, "reasoning" | "reasoningTokens" | "reasoningMs" | "toolCallErrors">> & { toolCalls?: readonly ToolCall[] };

let last: Reply | undefined;

/**
 * The reply the worker sent most recently in this process, finished or cancelled. An interrupted
 * cell never assigns `const story = await m.chat(...)`; the kept text is here (see qwen.lastReply()).
 */
export function lastReply(): Reply | undefined {
  return last;
}

// Defined outside the class body so the public .d.ts does not depend on Node's util types.
Object.defineProperty(Reply.prototype, inspect.custom, {
  value(this: Reply): string {
    return `Reply(${this.completionTokens} tokens, ${this.finishReason}, ${this.tokensPerSecond.toFixed(1)} tok/s)`;
  },
});
