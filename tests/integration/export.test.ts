// Save, merge, GGUF export and quantized loads through a real worker with the tiny model, checked from
// the outside: plain transformers / peft reload what was written (export_check.py), llama.cpp runs the
// GGUF file (tests/gguf/run-gguf.mjs). Relative paths are resolved against the cwd, as in a notebook.
import { spawn } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { inspect } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ExportReport, Qwen, WorkerError, type Model } from "../../kernel/src/index";
import type { DisplayBundle, DisplaySink } from "../../kernel/src/display/sink";
import { privateRuntimeDir, PythonLines, repo, tinyModel, tinyQwen3Model } from "./helpers";

const PROMPT = "Once upon a time, in a small village,";
const TEXTS = ["The quick brown fox jumps over the lazy dog.", "你好，你是谁？ def f(x): return x * 2"];

interface ChatPrompt { prompt_ids: number[]; greedy_ids: number[]; smallest_gap: number }
interface Compare { max_diff: number; adapter_effect: number }

const scratch = mkdtempSync(join(tmpdir(), "qwenbook-export-it-"));
const startDir = process.cwd();
const out: string[] = [];
const shown: DisplayBundle[] = [];
const sink: DisplaySink = { text: (t) => void out.push(t), display: (bundle) => void shown.push(bundle) };
let qwen: Qwen;
let model: Model;
let prepared: Promise<unknown[]>;

// One export_check.py process for the file: it imports torch, transformers and peft and loads the base model
// once, then answers each check (a fresh interpreter per check cost ~5 s of CPU each).
let checker: PythonLines | undefined;
function check(jobs: object[]): Promise<unknown[]> {
  checker ??= new PythonLines([join(repo, "tests", "integration", "export_check.py"), tinyModel(), "-"], { OMP_NUM_THREADS: "1" });
  return checker.ask<unknown[]>(jobs);
}

function runLlama(spec: object): Promise<{ greedy: number[][] }> {
  const file = join(scratch, "llama-spec.json");
  writeFileSync(file, JSON.stringify(spec));
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [join(repo, "tests", "gguf", "run-gguf.mjs"), file], { cwd: repo });
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => (out += d));
    child.stderr.on("data", (d: Buffer) => (err += d));
    child.once("exit", (code) => (code === 0 ? resolve(JSON.parse(out) as { greedy: number[][] }) : reject(new Error(`run-gguf.mjs failed (exit ${code}):\n${err}`))));
  });
}

async function rejection(p: Promise<unknown>): Promise<Error> {
  const e = await p.then(() => null, (err: unknown) => err);
  if (!(e instanceof Error)) throw new Error(`expected a rejection with an Error, got ${String(e)}`);
  return e;
}

/** Hidden staging folders/files (.name.partial-XXXX) left in `dir`: there must never be any. */
function staging(dir: string): string[] {
  return readdirSync(dir).filter((n) => n.startsWith("."));
}

beforeAll(async () => {
  privateRuntimeDir("export");
  // GPTQ runs thousands of tiny ops; on a busy 2-core machine more than one thread per op only adds waiting.
  process.env.OMP_NUM_THREADS = "1";
  process.chdir(scratch); // the notebook's folder: relative paths below resolve here
  mkdirSync("data");
  copyFileSync(join(repo, "notebooks", "data", "calib.json"), join("data", "calib.json"));
  prepared = check([
    { kind: "adapter", out: join(scratch, "adapters", "a"), seed: 3 },
    { kind: "llama", out: join(scratch, "tiny-llama") },
    { kind: "chat_prompt", messages: [{ role: "user", content: PROMPT }], max_tokens: 16 },
    { kind: "env" },
    { kind: "chat_prompt", messages: [{ role: "user", content: PROMPT }], max_tokens: 16, model: tinyQwen3Model() },
  ]);
  prepared.catch(() => undefined); // reported by the tests that use it
  qwen = new Qwen({ sink });
  model = await qwen.load(tinyModel(), { dtype: "fp32", device: "cpu", quiet: true });
  await prepared;
});

afterAll(async () => {
  checker?.close();
  await qwen?.shutdown();
  process.chdir(startDir);
  rmSync(scratch, { recursive: true, force: true });
});

describe("save and export through a real worker", () => {
  it("saves sharded safetensors + index + tokenizer that plain transformers reloads with the same logits", async () => {
    out.length = shown.length = 0;
    const report = await model.save("out/plain", { shardSize: "200KB" });
    expect(report).toBeInstanceOf(ExportReport);
    expect(report.path).toBe(join(scratch, "out", "plain"));
    expect(report.format).toBe("safetensors");
    const names = report.files.map((f) => f.path);
    expect(names).toEqual(expect.arrayContaining(["model.safetensors.index.json", "config.json", "tokenizer.json", "generation_config.json"]));
    expect(names.filter((n) => /^model-\d{5}-of-\d{5}\.safetensors$/.test(n)).length).toBe(report.details.shards);
    expect(report.details.shards).toBeGreaterThanOrEqual(3);
    expect(report.totalBytes).toBe(report.files.reduce((s, f) => s + f.bytes, 0));
    expect(report.quality).toBeNull();
    expect(out.join("")).toMatch(/\[save plain\] prepare 0%\n\[save plain\] write 0% \(0 B of \d+\.\d MB\)\n/);
    expect(shown.at(-1)!.data["text/plain"]).toBe(String(report));
    expect(shown.at(-1)!.data["text/html"]).toContain("<table>");
    expect(String(report)).toMatch(/model-00001-of-\d{5}\.safetensors +\d+\.\d MB/);

    const reply = await model.chat(PROMPT).greedy().maxTokens(12).quiet();
    const [cmp, hf] = (await check([
      { kind: "compare", folder: report.path, adapter: null, texts: TEXTS },
      { kind: "hf_greedy", folder: report.path, prompt_ids: ((await prepared)[2] as ChatPrompt).prompt_ids, max_tokens: 12 },
    ])) as [Compare, { ids: number[] }];
    expect(cmp.max_diff).toBe(0);
    expect(hf.ids).toEqual([...reply.tokenIds]);
  });

  it("merges a peft adapter folder: the saved model equals base + adapter, and the loaded model is unchanged", async () => {
    const before = await model.chat(PROMPT).greedy().maxTokens(12).quiet();
    const merge = model.merge({ adapter: "adapters/a" });
    expect(String(merge)).toBe(`MergeRequest(${model.id} + a)`);
    const report = await merge.save("out/merged", { shardSize: "2GB" });
    expect(report.details).toMatchObject({ merged: true, shards: 1, adapters: [join(scratch, "adapters", "a")] });
    const [cmp] = (await check([{ kind: "compare", folder: report.path, adapter: join(scratch, "adapters", "a"), texts: TEXTS }])) as [Compare];
    expect(cmp.adapter_effect).toBeGreaterThan(0.1); // the adapter matters...
    expect(cmp.max_diff).toBeLessThan(1e-4); // ...and is in the saved weights (fp32)
    const after = await model.chat(PROMPT).greedy().maxTokens(12).quiet();
    expect([...after.tokenIds]).toEqual([...before.tokenIds]);
  });

  it("exports an f16 GGUF that llama.cpp runs to the worker's greedy tokens", async () => {
    const report = await model.export("out/model-f16.gguf", { format: "gguf", type: "f16" });
    expect(report.format).toBe("gguf-f16");
    expect(report.files).toEqual([{ path: "model-f16.gguf", bytes: report.totalBytes }]);
    expect(readFileSync(report.path).subarray(0, 4).toString()).toBe("GGUF");
    expect(report.quality!.meanKl).toBeLessThan(1e-3); // f16 rounding of the weights only
    expect(inspect(report)).toMatch(/^ExportReport\(gguf-f16, 1 file, \d+\.\d MB, .*model-f16\.gguf; perplexity .* mean KL .* top-1 agreement/);
    expect(report.details.modelfile).toEqual({ path: "model-f16.Modelfile", template: "qwen2.5" });
    expect(readFileSync("out/model-f16.Modelfile", "utf8")).toMatch(/^FROM \.\/model-f16\.gguf\nTEMPLATE """/);

    const chat = (await prepared)[2] as ChatPrompt;
    // f16 moves logits by ~1e-3 here; a near-tie on the greedy path could flip legitimately.
    expect(chat.smallest_gap).toBeGreaterThan(0.01);
    const reply = await model.chat(PROMPT).greedy().maxTokens(16).quiet();
    expect([...reply.tokenIds]).toEqual(chat.greedy_ids.slice(0, reply.tokenIds.length));
    const llama = await runLlama({ model: report.path, prompts: [chat.prompt_ids], maxTokens: 16 });
    expect(llama.greedy[0]!.slice(0, reply.tokenIds.length)).toEqual([...reply.tokenIds]);
  });

  it("exports a Qwen3 model as a qwen3 GGUF (q/k norms) that llama.cpp runs to the worker's greedy tokens", async () => {
    const q3 = await qwen.load(tinyQwen3Model(), { dtype: "fp32", device: "cpu", quiet: true });
    try {
      const chat = (await prepared)[4] as ChatPrompt;
      expect(chat.smallest_gap).toBeGreaterThan(0.01); // f16 moves logits by ~1e-3
      const reply = await q3.chat(PROMPT).greedy().maxTokens(16).quiet();
      expect([...reply.tokenIds]).toEqual(chat.greedy_ids.slice(0, reply.tokenIds.length));
      // Its own folder: the last test below lists what "out" holds.
      const report = await q3.export("qwen3-out/model-f16.gguf", { format: "gguf", type: "f16" });
      expect(report.format).toBe("gguf-f16");
      expect(report.quality!.meanKl).toBeLessThan(1e-3);
      const llama = await runLlama({ model: report.path, prompts: [chat.prompt_ids], maxTokens: 16 });
      expect(llama.greedy[0]!.slice(0, reply.tokenIds.length)).toEqual([...reply.tokenIds]);
    } finally {
      await q3.unload();
    }
  });

  it("loads int8 and int4 weight-only, reports what it cost, and status shows it", async () => {
    out.length = 0;
    const q8 = await qwen.load(tinyModel(), { dtype: "fp32", quant: "int8" });
    const q4 = await qwen.load(tinyModel(), { dtype: "fp32", quant: "int4", groupSize: 64 });
    expect([q8.id, q4.id]).toEqual([`${model.id}:int8`, `${model.id}:int4`]);
    expect(out.join("")).toMatch(/\] quantize \d+%: quantizing linear layers to int8/);
    expect(out.join("")).toMatch(/ {2}int8 \(nearest\): 14 linear layers in \d+\.\d kB \(bf16: \d+ kB\); perplexity .* mean KL .* top-1 agreement/);
    const [s8, s4] = [q8.info.quant!, q4.info.quant!];
    expect(s4.quantizedBytes).toBeLessThan(s8.quantizedBytes);
    expect(s8.quantizedBytes).toBeLessThan(s8.bf16Bytes);
    // int8 stays close to fp32 on the held-out text; int4 on this tiny random model much less so.
    expect(s8.quality!.meanKl!).toBeLessThan(0.2);
    expect(s8.quality!.top1Agreement!).toBeGreaterThan(0.7);
    expect(s4.quality!.meanKl!).toBeGreaterThan(s8.quality!.meanKl!);
    for (const q of [q8, q4]) expect((await q.chat(PROMPT).greedy().maxTokens(8).quiet()).completionTokens).toBeGreaterThan(0);

    const status = await qwen.status();
    const byId = new Map(status.models.map((m) => [m.id, m]));
    expect(byId.get(q8.id)?.quant).toMatchObject({ method: "int8", fromFolder: false, layers: 14 });
    expect(byId.get(q4.id)?.quant).toMatchObject({ method: "int4", groupSize: 64 });
    expect(byId.get(model.id)?.quant).toBeUndefined();
    await q4.unload();
  });

  it("saves int4 with GPTQ calibration from an int8-loaded model, and the folder reloads quantized", async () => {
    const q8 = await qwen.load(tinyModel(), { dtype: "fp32", quant: "int8", quiet: true });
    const report = await q8.save("out/merged-int4", { quant: "int4", groupSize: 128, calibration: "data/calib.json" });
    expect(report.format).toBe("safetensors-int4");
    expect(report.details).toMatchObject({ rounding: "gptq", requantizedFrom: realpathSync(tinyModel()) });
    expect(report.files.map((f) => f.path)).toEqual(expect.arrayContaining(["quantized.safetensors", "qwenbook-quant.json"]));
    expect(report.quality).toMatchObject({ tokens: expect.any(Number), meanKl: expect.any(Number), top1Agreement: expect.any(Number) });
    expect(String(report)).toMatch(/quality on \d+ tokens of built-in held-out text:\n {2}perplexity .*mean KL .*top-1 agreement \d+\.\d%$/);

    const again = await qwen.load("out/merged-int4", { quiet: true });
    expect(again.id).toBe("merged-int4:fp32:cpu:int4");
    expect(again.info.quant).toMatchObject({ method: "int4", fromFolder: true, rounding: "gptq" });
    expect((await again.chat(PROMPT).greedy().maxTokens(8).quiet()).completionTokens).toBeGreaterThan(0);
    await again.unload();
    await q8.unload();
  });

  it("bad input fails with a readable error and leaves no partial file or folder", async () => {
    expect(() => model.merge({} as { adapter: string })).toThrow(/merge\(\) needs the adapter to fold in/);
    expect(() => model.merge({ adapter: "adapters/none" })).toThrow(`No adapter folder at ${join(scratch, "adapters", "none")}`);
    await expect(model.save("out/x", { shardSize: "2 gigs" })).rejects.toThrow(/shardSize must be a size like "2GB"/);
    await expect(model.save("out/x", { quant: "int4", groupSize: 100 as 128 })).rejects.toThrow("save option groupSize must be 32, 64 or 128, got 100");
    await expect(model.export("out/m.gguf", { type: "q5_k" as "f16" })).rejects.toThrow(/export option type must be one of "f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k", got "q5_k"/);

    mkdirSync("out/kept");
    writeFileSync("out/kept/notes.txt", "precious");
    const exists = await rejection(model.save("out/kept"));
    expect(exists).toBeInstanceOf(WorkerError);
    expect(exists.message).toMatch(/^save failed: TargetExistsError: .*out\/kept: the folder exists and is not empty\. Nothing was written; pass \{ overwrite: true \}/);
    expect(readdirSync("out/kept")).toEqual(["notes.txt"]);
    const replaced = await model.save("out/kept", { overwrite: true, quiet: true });
    expect(replaced.files.map((f) => f.path)).not.toContain("notes.txt");

    const again = await rejection(model.export("out/model-f16.gguf"));
    expect(again.message).toMatch(/TargetExistsError: .*the file already exists/);

    const llama = await qwen.load("tiny-llama", { quiet: true });
    const arch = await rejection(llama.export("out/llama.gguf"));
    expect((arch as WorkerError).ename).toBe("UnsupportedArchitectureError");
    expect(arch.message).toMatch(/GGUF export supports Qwen2ForCausalLM, Qwen3ForCausalLM.*this model is LlamaForCausalLM/);
    await llama.unload();

    if (!((await prepared)[3] as { bitsandbytes: boolean }).bitsandbytes) {
      const nf4 = await rejection(qwen.load(tinyModel(), { quant: "nf4", quiet: true }));
      expect((nf4 as WorkerError).ename).toBe("QuantBackendMissing");
      expect(nf4.message).toMatch(/needs the bitsandbytes package.*use quant 'int4'/);
    }
    expect(readdirSync("out").sort()).toEqual(["kept", "merged", "merged-int4", "model-f16.Modelfile", "model-f16.gguf", "plain"]);
    expect(staging("out")).toEqual([]);
  });
});
