import { describe, expect, it } from "vitest";
import { createLoadProgress, formatBytes } from "./progress";

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
