import { inspect } from "node:util";
import { describe, expect, it } from "vitest";
import type { ExportReply } from "../bridge/protocol.gen";
import { ExportReport, formatSize, quantSummary } from "./report";

const int4: ExportReply = {
  status: "ok",
  path: "/work/out/merged-int4",
  format: "safetensors-int4",
  sizes: {
    root: "/work/out/merged-int4",
    total_bytes: 50_419_000,
    files: [
      { path: "config.json", bytes: 795 },
      { path: "quantized.safetensors", bytes: 38_995_000 },
      { path: "tokenizer.json", bytes: 11_422_650 },
    ],
  },
  quality: { tokens: 342, perplexity: 12.5, reference_perplexity: 12.25, mean_kl: 0.0123, top1_agreement: 0.971, text: "built-in held-out text" },
  details: { layers: 14, rounding: "gptq", requantized_from: "/work/out/merged" },
};

describe("ExportReport", () => {
  it("shows files with human sizes and the quality figures", () => {
    const r = ExportReport.fromWire(int4);
    expect(String(r)).toBe(
      [
        "safetensors-int4 → /work/out/merged-int4",
        "  config.json               795 B",
        "  quantized.safetensors   39.0 MB",
        "  tokenizer.json          11.4 MB",
        "  total (3 files)         50.4 MB",
        "rounding: gptq",
        "quantized again from the unquantized weights in /work/out/merged",
        "quality on 342 tokens of built-in held-out text:",
        "  perplexity 12.50 (unquantized 12.25), mean KL 0.01230 nats, top-1 agreement 97.1%",
      ].join("\n"),
    );
    expect(inspect(r)).toBe(
      "ExportReport(safetensors-int4, 3 files, 50.4 MB, /work/out/merged-int4; perplexity 12.50 (unquantized 12.25), mean KL 0.01230 nats, top-1 agreement 97.1%)",
    );
    expect(r.quality?.top1Agreement).toBe(0.971);
    expect(r.details.requantizedFrom).toBe("/work/out/merged");
  });

  it("lists a K-quant mix's tensor types and the Ollama Modelfile", () => {
    const r = ExportReport.fromWire({
      ...int4,
      path: "/w/m.gguf",
      format: "gguf-q4_k_m",
      sizes: { root: "/w", total_bytes: 400_000_000, files: [{ path: "m.gguf", bytes: 400_000_000 }] },
      quality: undefined,
      details: {
        tensors: 290, kept_f16: [], types: ["f32", "q4_k", "q6_k"], tensor_types: { f32: 121, q4_k: 144, q6_k: 25 },
        other_types: { "output.weight": "q6_k: output layer" },
        modelfile: { path: "m.Modelfile", template: "qwen2.5", stop: ["<|im_end|>"], parameters: { temperature: 0.7 } },
      },
    });
    expect(r.details.tensorTypes).toEqual({ f32: 121, q4_k: 144, q6_k: 25 });
    expect(r.details.otherTypes).toEqual({ "output.weight": "q6_k: output layer" });
    expect(r.details.modelfile).toEqual({ path: "m.Modelfile", template: "qwen2.5" });
    expect(String(r).split("\n").slice(-2)).toEqual(["tensor types: 121 f32, 144 q4_k, 25 q6_k", "Ollama: ollama create <name> -f m.Modelfile"]);
  });

  it("is a text/plain + text/html bundle for the notebook, with paths escaped", () => {
    const r = ExportReport.fromWire({ ...int4, path: "/o/<x>", quality: undefined, details: {} });
    const b = r.bundle();
    expect(Object.keys(b.data)).toEqual(["text/plain", "text/html"]);
    expect(b.data["text/html"]).toContain("<code>/o/&lt;x&gt;</code>");
    expect(b.data["text/html"]).toContain("<b>50.4 MB</b>");
    expect(r.quality).toBeNull();
    expect(inspect(r)).toBe("ExportReport(safetensors-int4, 3 files, 50.4 MB, /o/<x>)");
  });

  it("formats sizes in powers of 1000 and summarises a quantized load", () => {
    expect([0, 999, 1500, 2e9, 123.4e9].map(formatSize)).toEqual(["0 B", "999 B", "1.5 kB", "2.0 GB", "123 GB"]);
    expect(
      quantSummary({ method: "int4", groupSize: 128, rounding: "nearest", layers: 196, quantizedBytes: 4.1e9, bf16Bytes: 14.5e9, fromFolder: false }),
    ).toBe("int4 (group 128, nearest): 196 linear layers in 4.1 GB (bf16: 14.5 GB)");
  });
});
