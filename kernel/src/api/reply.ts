import { inspect } from "node:util";
import type { GenerateReply } from "../bridge/protocol.gen";
import type { FinishReason } from "./types";

/**
 * A finished (or cancelled) generation. `String(reply)` is its text; it inspects as a one-line
 * summary so a notebook that shows the awaited value does not print the text a second time.
 */
export class Reply {
  readonly text: string;
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

  constructor(fields: Omit<Reply, "toString" | "toJSON" | "cancelled">) {
    this.text = fields.text;
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

  /** True when an interrupt or cancel stopped it; `text` holds what was generated until then. */
  get cancelled(): boolean {
    return this.finishReason === "cancelled";
  }

  toString(): string {
    return this.text;
  }

  toJSON(): Record<string, unknown> {
    const { text, finishReason, promptTokens, completionTokens, ttftMs, durationMs, tokensPerSecond, model } = this;
    return { text, finishReason, promptTokens, completionTokens, ttftMs, durationMs, tokensPerSecond, model };
  }
}

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
