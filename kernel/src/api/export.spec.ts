import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import type { DisplayBundle, DisplayOptions } from "../display/sink";
import { checkAdapters, checkShardSize, createExportProgress, createExportReporter, exportRequest, quantOptions, saveRequest } from "./export";
import { ExportReport } from "./report";

const dir = mkdtempSync(join(tmpdir(), "qwenbook-export-spec-"));
mkdirSync(join(dir, "runs", "x", "adapter"), { recursive: true });
writeFileSync(join(dir, "runs", "x", "adapter", "adapter_config.json"), "{}");
mkdirSync(join(dir, "model"));
writeFileSync(join(dir, "model", "config.json"), "{}");
mkdirSync(join(dir, "data"));
writeFileSync(join(dir, "data", "calib.json"), "[]");
writeFileSync(join(dir, "data", "calib.csv"), "");

describe("save options", () => {
  it("resolves the target against the notebook's folder and maps options onto the wire names", () => {
    const { body, quiet } = saveRequest("out/merged", { shardSize: "2GB", dtype: "bf16", overwrite: true, adapter: "runs/x/adapter" }, dir);
    expect(body).toEqual({
      target: join(dir, "out", "merged"),
      shard_size: "2GB",
      dtype: "bf16",
      overwrite: true,
      adapters: [join(dir, "runs", "x", "adapter")],
    });
    expect(quiet).toBe(false);
    const q = saveRequest("/abs/q", { quant: "int4", groupSize: 64, calibration: "data/calib.json", shardSize: 1_000_000 }, dir).body;
    expect(q).toEqual({ target: "/abs/q", shard_size: "1000000", quant: { method: "int4", group_size: 64, calibration: join(dir, "data", "calib.json") } });
  });

  it("refuses unknown keys and bad values, naming the option and the value", () => {
    expect(() => saveRequest("o", { shardsize: "2GB" }, dir)).toThrow(/save\(path, options\) has no option "shardsize"; known options: shardSize/);
    expect(() => saveRequest("o", { shardSize: "2 gigs" }, dir)).toThrow(
      new RangeError('save option shardSize must be a size like "2GB", "500MB" or "1.5GiB", or a whole number of bytes, got "2 gigs"'),
    );
    expect(() => saveRequest("o", { shardSize: 0 }, dir)).toThrow(RangeError);
    expect(() => saveRequest("o", { shardSize: "1.5" }, dir)).toThrow(RangeError);
    expect(() => saveRequest("o", { dtype: "int8" }, dir)).toThrow(/save option dtype must be one of "bf16", "fp16", "fp32", got "int8"/);
    expect(() => saveRequest("o", { quant: "int4", groupSize: 100 }, dir)).toThrow(new RangeError("save option groupSize must be 32, 64 or 128, got 100"));
    expect(() => saveRequest("o", { groupSize: 64 }, dir)).toThrow(/groupSize applies to quant: "int4"/);
    expect(() => saveRequest("o", { quant: "int8", calibration: "data/calib.json" }, dir)).toThrow(/apply to quant: "int4", not "int8"/);
    expect(() => saveRequest("o", { quant: "nf4" }, dir)).toThrow(/"nf4" cannot be saved/);
    expect(() => saveRequest("o", { quant: "int4", calibration: "data/none.json" }, dir)).toThrow(`No calibration file at ${join(dir, "data", "none.json")}`);
    expect(() => saveRequest("o", { quant: "int4", calibration: "data/calib.csv" }, dir)).toThrow(/\.txt, \.json or \.jsonl/);
    expect(() => saveRequest("", {}, dir)).toThrow(/save\(path\) must not be empty/);
  });

  it("accepts the size spellings the worker reads", () => {
    expect(["2GB", "500MB", "1.5GiB", " 750 kb ", "4096", "100B"].map((s) => checkShardSize(s))).toEqual(["2GB", "500MB", "1.5GiB", "750 kb", "4096", "100B"]);
  });
});

describe("adapters", () => {
  it("must be existing adapter folders", () => {
    expect(checkAdapters(["runs/x/adapter"], "merge({ adapter })", dir)).toEqual([join(dir, "runs", "x", "adapter")]);
    expect(() => checkAdapters("runs/y", "merge({ adapter })", dir)).toThrow(`No adapter folder at ${join(dir, "runs", "y")}`);
    expect(() => checkAdapters("model", "merge({ adapter })", dir)).toThrow(/has no adapter_config.json; it is a full model folder/);
    expect(() => checkAdapters([], "merge({ adapter })", dir)).toThrow(/non-empty list/);
  });
});

describe("export options", () => {
  it("writes GGUF files of the known types", () => {
    expect(exportRequest("out/m.gguf", { type: "q4_0" }, dir).body).toEqual({ target: join(dir, "out", "m.gguf"), format: "gguf", type: "q4_0" });
    expect(exportRequest("out/m.gguf", { type: "Q4_K_M", modelfile: false }, dir).body).toEqual(
      { target: join(dir, "out", "m.gguf"), format: "gguf", type: "q4_k_m", modelfile: false });
    expect(exportRequest("out/m.gguf", { type: "q6_k" }, dir).body.type).toBe("q6_k");
    expect(() => exportRequest("out/m.gguf", { type: "q5_k" }, dir)).toThrow(
      new RangeError('export option type must be one of "f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k", got "q5_k"'),
    );
    expect(() => exportRequest("out/m.gguf", { modelfile: "yes" }, dir)).toThrow(/modelfile/);
    expect(() => exportRequest("out/m.gguf", { format: "onnx" }, dir)).toThrow(/format must be one of "gguf"/);
    expect(() => exportRequest("out/model", {}, dir)).toThrow(/ending in \.gguf, got "out\/model"/);
    expect(() => exportRequest("out/m.gguf", { shardSize: "2GB" }, dir)).toThrow(/has no option "shardSize"/);
  });
});

describe("load quant options", () => {
  it("allow nf4 and require int4 for groupSize", () => {
    expect(quantOptions("load", { quant: "nf4" }, ["int8", "int4", "nf4"], dir)).toEqual({ method: "nf4" });
    expect(quantOptions("load", {}, ["int8", "int4", "nf4"], dir)).toBeUndefined();
    expect(() => quantOptions("load", { quant: "int3" }, ["int8", "int4", "nf4"], dir)).toThrow(/load option quant must be one of "int8", "int4", "nf4"/);
  });
});

describe("export progress lines", () => {
  it("prints each stage once, quarters of the write stage with sizes, and leaves done to the report", () => {
    const lines: string[] = [];
    const on = createExportProgress("save merged", (l) => lines.push(l));
    on({ stage: "prepare", fraction: 0, bytes_done: 0, bytes_total: 40e6 });
    for (let i = 0; i <= 40; i++) on({ stage: "write", fraction: (0.99 * i) / 40, bytes_done: i * 1e6, bytes_total: 40e6 });
    on({ stage: "tokenizer", fraction: 0.99, bytes_done: 40e6, bytes_total: 40e6 });
    on({ stage: "done", fraction: 1, bytes_done: 40e6, bytes_total: 40e6 });
    expect(lines).toEqual([
      "[save merged] prepare 0%\n",
      "[save merged] write 0% (0 B of 40.0 MB)\n",
      "[save merged] write 27% (11.0 MB of 40.0 MB)\n",
      "[save merged] write 52% (21.0 MB of 40.0 MB)\n",
      "[save merged] write 77% (31.0 MB of 40.0 MB)\n",
      "[save merged] tokenizer 99%\n",
    ]);
  });
});

describe("export reporter", () => {
  const report = new ExportReport({ path: "/o/m.gguf", format: "gguf-f16", files: [{ path: "m.gguf", bytes: 2e6 }], totalBytes: 2e6, quality: null, details: {} });

  it("in a notebook rewrites one progress line and turns it into the report table", () => {
    const shown: [DisplayBundle, DisplayOptions | undefined][] = [];
    const sink = { rich: true, text: () => undefined, display: (b: DisplayBundle, o?: DisplayOptions) => void shown.push([b, o]) };
    const r = createExportReporter("export m.gguf", sink, { intervalMs: 0 });
    r.progress({ stage: "prepare", fraction: 0, bytes_done: 0, bytes_total: 2e6 });
    r.progress({ stage: "write", fraction: 0.5, bytes_done: 1e6, bytes_total: 2e6 });
    r.done(report);
    expect(shown.map(([b]) => b.data["text/plain"])).toEqual(["[export m.gguf] prepare 0%", "[export m.gguf] write 50% (1.0 MB of 2.0 MB)", String(report)]);
    const ids = new Set(shown.map(([, o]) => o?.id));
    expect(ids.size).toBe(1);
    expect(shown.map(([, o]) => o?.update)).toEqual([false, true, true]);
    expect(shown.at(-1)![0].data["text/html"]).toContain("<table>");
  });

  it("in a terminal prints progress lines, then the table's text; a failure ends the line in a notebook", () => {
    const text: string[] = [];
    const displayed: DisplayBundle[] = [];
    const plain = createExportReporter("save x", { text: (t) => void text.push(t), display: (b) => void displayed.push(b) });
    plain.progress({ stage: "prepare", fraction: 0, bytes_done: 0, bytes_total: 1 });
    plain.done(report);
    expect(text).toEqual(["[save x] prepare 0%\n"]);
    expect(displayed.map((b) => b.data["text/plain"])).toEqual([String(report)]);

    const shown: string[] = [];
    const rich = createExportReporter("save x", { rich: true, text: () => undefined, display: (b) => void shown.push(String(b.data["text/plain"])) }, { intervalMs: 0 });
    rich.progress({ stage: "write", fraction: 0.25, bytes_done: 1, bytes_total: 4 });
    rich.failed();
    expect(shown).toEqual(["[save x] write 25% (1 B of 4 B)", "[save x] write 25% (1 B of 4 B) (failed)"]);
  });
});
