import { afterEach, describe, expect, it, vi } from "vitest";
import { recordingSink } from "../display/testutil";
import { createLoadProgress, createLoadReporter, formatBytes } from "./progress";

describe("load progress lines", () => {
  it("prints each stage once and a long stage only at each quarter, leaving ready to the summary", () => {
    const lines: string[] = [];
    const on = createLoadProgress("Qwen/Q", (l) => lines.push(l));
    on({ stage: "resolve", message: "finding Qwen/Q" });
    on({ stage: "resolve", message: "finding Qwen/Q" });
    for (let i = 0; i <= 100; i++) on({ stage: "download", message: "model.safetensors", fraction: i / 100, bytes_done: i * 1024 ** 2, bytes_total: 100 * 1024 ** 2 });
    on({ stage: "ready", message: "ready", fraction: 1 });
    expect(lines).toEqual([
      "[Qwen/Q] resolve: finding Qwen/Q\n",
      "[Qwen/Q] download 0%: model.safetensors (0 B of 100.0 MB)\n",
      "[Qwen/Q] download 25%: model.safetensors (25.0 MB of 100.0 MB)\n",
      "[Qwen/Q] download 50%: model.safetensors (50.0 MB of 100.0 MB)\n",
      "[Qwen/Q] download 75%: model.safetensors (75.0 MB of 100.0 MB)\n",
      "[Qwen/Q] download 100%: model.safetensors (100.0 MB of 100.0 MB)\n",
    ]);
  });

  it("formats byte counts", () => {
    expect([formatBytes(0), formatBytes(1536), formatBytes(15 * 1024 ** 3)]).toEqual(["0 B", "1.5 KB", "15.0 GB"]);
  });
});

describe("load progress in a notebook", () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  const weights = (i: number) => ({ stage: "weights" as const, message: "reading weights", fraction: i / 100 });

  it("rewrites one output line in place, at most 20 times a second, ending with the summary", () => {
    vi.useFakeTimers();
    const sink = recordingSink({ rich: true });
    const report = createLoadReporter("tiny", sink);
    report.progress({ stage: "resolve", message: "finding tiny" });
    for (let i = 0; i <= 100; i++) {
      report.progress(weights(i));
      vi.advanceTimersByTime(5);
    }
    report.progress({ stage: "ready", message: "ready", fraction: 1 });
    report.done("loaded tiny (qwen2, 10.0M parameters, fp32 on cpu) in 0.5 s");
    const [first, ...rest] = sink.displays;
    expect(first).toMatchObject({ update: false, data: { "text/plain": "[tiny] resolve: finding tiny" } });
    expect(rest.every((d) => d.update && d.id === first.id)).toBe(true);
    expect(rest.length).toBeLessThanOrEqual(505 / 50 + 2);
    const percents = rest.slice(0, -1).map((d) => Number(/^\[tiny\] weights (\d+)%: reading weights$/.exec(String(d.data["text/plain"]))?.[1]));
    expect(percents.length).toBeGreaterThan(2);
    expect(percents.every(Number.isFinite)).toBe(true);
    expect(percents).toEqual([...percents].sort((a, b) => a - b));
    expect(rest[rest.length - 1].data["text/plain"]).toBe("loaded tiny (qwen2, 10.0M parameters, fp32 on cpu) in 0.5 s");
    expect(sink.texts).toEqual([]);
  });

  it("prints the summary as text when nothing was shown, and marks a failed load", () => {
    const quick = recordingSink({ rich: true });
    createLoadReporter("tiny", quick).done("tiny is already loaded");
    expect(quick.displays).toEqual([]);
    expect(quick.texts).toEqual(["tiny is already loaded\n"]);

    const failing = recordingSink({ rich: true });
    const report = createLoadReporter("tiny", failing);
    report.progress(weights(40));
    report.failed();
    expect(failing.displays.map((d) => d.data["text/plain"])).toEqual([
      "[tiny] weights 40%: reading weights",
      "[tiny] weights 40%: reading weights (failed)",
    ]);
  });

  it("prints a few lines and the summary in a terminal", () => {
    const sink = recordingSink({ rich: false });
    const report = createLoadReporter("tiny", sink);
    for (let i = 0; i <= 100; i++) report.progress(weights(i));
    report.done("loaded tiny");
    expect(sink.displays).toEqual([]);
    expect(sink.texts).toEqual([
      "[tiny] weights 0%: reading weights\n",
      "[tiny] weights 25%: reading weights\n",
      "[tiny] weights 50%: reading weights\n",
      "[tiny] weights 75%: reading weights\n",
      "[tiny] weights 100%: reading weights\n",
      "loaded tiny\n",
    ]);
  });
});
