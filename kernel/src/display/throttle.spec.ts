import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { createThrottle } from "./throttle";

describe("createThrottle", () => {
  beforeEach(() => {
    vi.useFakeTimers();
  });
  afterEach(() => {
    vi.useRealTimers();
  });

  function setup(intervalMs = 50) {
    const seen: number[] = [];
    const t = createThrottle<number>((v) => seen.push(v), { intervalMs });
    return { t, seen };
  }

  it("delivers the first value at once", () => {
    const { t, seen } = setup();
    t.push(1);
    expect(seen).toEqual([1]);
  });

  it("coalesces values inside one interval into the newest", () => {
    const { t, seen } = setup();
    t.push(1);
    t.push(2);
    t.push(3);
    t.push(4);
    expect(seen).toEqual([1]);
    vi.advanceTimersByTime(49);
    expect(seen).toEqual([1]);
    vi.advanceTimersByTime(1);
    expect(seen).toEqual([1, 4]);
  });

  it("keeps a steady stream at no more than one delivery per interval", () => {
    const { t, seen } = setup(50);
    // 1,000 tokens a second for two seconds: one push per millisecond.
    for (let i = 0; i < 2000; i++) {
      t.push(i);
      vi.advanceTimersByTime(1);
    }
    t.finish();
    expect(seen.length).toBeGreaterThanOrEqual(40);
    expect(seen.length).toBeLessThanOrEqual(42);
    expect(seen[seen.length - 1]).toBe(1999);
    // Values only move forward: nothing stale is delivered after something newer.
    expect([...seen].sort((a, b) => a - b)).toEqual(seen);
  });

  it("sends a slow stream through unchanged", () => {
    const { t, seen } = setup(50);
    for (let i = 0; i < 5; i++) {
      t.push(i);
      vi.advanceTimersByTime(200);
    }
    expect(seen).toEqual([0, 1, 2, 3, 4]);
  });

  it("finish delivers the waiting value immediately and cancels the timer", () => {
    const { t, seen } = setup();
    t.push(1);
    t.push(2);
    t.finish();
    expect(seen).toEqual([1, 2]);
    vi.advanceTimersByTime(1000);
    expect(seen).toEqual([1, 2]);
    expect(vi.getTimerCount()).toBe(0);
  });

  it("finish with a value delivers that value even right after another delivery", () => {
    const { t, seen } = setup();
    t.push(1);
    t.push(2);
    t.finish(3);
    expect(seen).toEqual([1, 3]);
    expect(t.delivered).toBe(2);
  });

  it("finish with nothing waiting delivers nothing more", () => {
    const { t, seen } = setup();
    t.push(1);
    t.finish();
    expect(seen).toEqual([1]);
  });

  it("ignores pushes after finish", () => {
    const { t, seen } = setup();
    t.push(1);
    t.finish(2);
    t.push(3);
    vi.advanceTimersByTime(1000);
    t.finish(4);
    expect(seen).toEqual([1, 2]);
  });

  it("cancel drops the waiting value", () => {
    const { t, seen } = setup();
    t.push(1);
    t.push(2);
    t.cancel();
    vi.advanceTimersByTime(1000);
    expect(seen).toEqual([1]);
    expect(vi.getTimerCount()).toBe(0);
  });

  it("reports an error thrown by a timed delivery on the next call", () => {
    let calls = 0;
    const t = createThrottle<number>(() => {
      calls += 1;
      if (calls === 2) throw new Error("socket closed");
    });
    t.push(1);
    t.push(2);
    expect(() => vi.advanceTimersByTime(50)).not.toThrow();
    expect(() => t.push(3)).toThrow("socket closed");
  });

  it("still delivers the final value when an earlier timed delivery failed", () => {
    const seen: number[] = [];
    const t = createThrottle<number>((v) => {
      if (v === 2) throw new Error("boom");
      seen.push(v);
    });
    t.push(1);
    t.push(2);
    vi.advanceTimersByTime(50);
    expect(() => t.finish(3)).toThrow("boom");
    expect(seen).toEqual([1, 3]);
  });

  it("with interval 0 delivers everything", () => {
    const { t, seen } = setup(0);
    t.push(1);
    t.push(2);
    t.push(3);
    expect(seen).toEqual([1, 2, 3]);
  });

  it("rejects a negative or non-numeric interval with the value it got", () => {
    expect(() => createThrottle(() => {}, { intervalMs: -1 })).toThrow(/intervalMs .* got -1/);
    expect(() => createThrottle(() => {}, { intervalMs: Number.NaN })).toThrow(/got NaN/);
  });
});
