import { inspect } from "node:util";
import { describe, expect, it } from "vitest";
import { beginCell, isShown, markShown, SHOWN } from "./shown";

describe("markShown", () => {
  it("marks an object under the well-known symbol without changing how it prints or serialises", () => {
    const stats = { requests: 3 };
    expect(markShown(stats)).toBe(stats);
    expect(isShown(stats)).toBe(true);
    expect(SHOWN).toBe(Symbol.for("qwenbook.shown"));
    expect(JSON.stringify(stats)).toBe('{"requests":3}');
    expect(inspect(stats)).toBe("{ requests: 3 }");
    expect(Object.keys(stats)).toEqual(["requests"]);
  });

  it("leaves unmarked objects, primitives and frozen objects unmarked", () => {
    expect(isShown({})).toBe(false);
    expect(isShown(null)).toBe(false);
    expect(markShown(3)).toBe(3);
    expect(isShown(3)).toBe(false);
    const frozen = Object.freeze({ a: 1 });
    expect(markShown(frozen)).toBe(frozen);
    expect(isShown(frozen)).toBe(false);
  });

  it("counts only in the cell that drew it: named in a later cell, the value prints again", () => {
    beginCell();
    const reply = markShown({ text: "hi" });
    expect(isShown(reply)).toBe(true);
    beginCell();
    expect(isShown(reply)).toBe(false);
    markShown(reply);
    expect(isShown(reply)).toBe(true);
  });

  it("marks errors, which keep their message and stack", () => {
    const e = markShown(new Error("shown in the bubble"));
    expect(isShown(e)).toBe(true);
    expect(e.message).toBe("shown in the bubble");
  });
});
