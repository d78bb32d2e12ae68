import { inspect } from "node:util";
import { describe, expect, it } from "vitest";
import { Reply } from "./reply";

describe("Reply", () => {
  const wire = {
    status: "ok" as const, text: "你好！我是", finish_reason: "length" as const, prompt_tokens: 30, completion_tokens: 12,
    ttft_ms: 20.5, duration_ms: 141, tokens_per_s: 85.1, token_ids: [1, 2],
  };

  it("is its text as a string and a short summary when inspected, so a notebook does not print the text twice", () => {
    const r = Reply.fromWire(wire, "m");
    expect(String(r)).toBe("你好！我是");
    expect(`${r}`).toBe("你好！我是");
    expect(inspect(r)).toBe("Reply(12 tokens, length, 85.1 tok/s)");
    expect(r).toMatchObject({ finishReason: "length", promptTokens: 30, completionTokens: 12, ttftMs: 20.5, durationMs: 141, tokenIds: [1, 2] });
  });

  it("works out tokens per second when the worker leaves it out", () => {
    const { tokens_per_s: _, ...rest } = wire;
    expect(Reply.fromWire(rest, "m").tokensPerSecond).toBeCloseTo(12 / 0.141, 6);
  });

  it("serializes to JSON with its fields", () => {
    expect(JSON.parse(JSON.stringify(Reply.fromWire(wire, "m")))).toMatchObject({ text: "你好！我是", finishReason: "length", model: "m" });
  });
});
