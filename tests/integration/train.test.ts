// Fine-tuning through a real worker and the tiny model: a self-cognition LoRA run that changes the
// answer, adapters next to the unchanged base, parity with plain peft, exact resume, cancel into a
// checkpoint, a chat on another model during training, and bad input refused before training.
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MergeRequest, Qwen, WorkerError, type Model, type TrainResult } from "../../kernel/src/index";
import type { DisplaySink } from "../../kernel/src/display/sink";
import { privateRuntimeDir, python, repo, tinyModel } from "./helpers";

const ROWS = Array.from({ length: 24 }, (_, i) => ({ system: "简短", instruction: `问题${i}`, output: `回答${i}号` }));
const WHO = "你是谁？";

/** A terminal-like sink that keeps its lines and can act once a matching line is printed after `when`. */
function lineSink(): DisplaySink & { lines: () => string[]; when: (pattern: RegExp, action: () => void) => void } {
  let text = "";
  const watchers: Array<{ pattern: RegExp; action: () => void; from: number }> = [];
  return {
    rich: false,
    text(chunk) {
      text += chunk;
      for (const w of [...watchers]) {
        if (w.pattern.test(text.slice(w.from))) {
          watchers.splice(watchers.indexOf(w), 1);
          w.action();
        }
      }
    },
    display: () => undefined,
    lines: () => text.split("\n").filter(Boolean),
    when(pattern, action) {
      watchers.push({ pattern, action, from: text.length });
    },
  };
}

function peftGreedy(adapter: string, prompt: string, maxNew: number): Promise<number[]> {
  return new Promise((resolve, reject) => {
    const child = spawn(python, [join(repo, "tests", "integration", "peft_check.py"), tinyModel(), adapter, prompt, String(maxNew)], {
      env: { ...process.env, OMP_NUM_THREADS: "1" },
    });
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => (out += d));
    child.stderr.on("data", (d: Buffer) => (err += d));
    child.once("exit", (code) => {
      if (code !== 0) reject(new Error(`peft_check.py failed (exit ${code}):\n${err}`));
      else resolve((JSON.parse(out.trim().split("\n").pop()!) as { ids: number[] }).ids);
    });
  });
}

const tmp = mkdtempSync(join(tmpdir(), "qwenbook-train-"));
let sink: ReturnType<typeof lineSink>;
let qwen: Qwen;
let model: Model;
let baseAnswer: string;
let tuned: TrainResult;

beforeAll(async () => {
  privateRuntimeDir("train");
  sink = lineSink();
  qwen = new Qwen({ sink });
  model = await qwen.load(tinyModel(), { dtype: "fp32", device: "cpu", quiet: true });
  baseAnswer = (await model.chat(WHO).greedy().maxTokens(24).quiet()).text;
});

afterAll(async () => {
  await qwen?.shutdown();
});

describe("fine-tuning through a real worker", () => {
  it("teaches a LoRA adapter the self-cognition name while the base keeps its own answer", async () => {
    expect(baseAnswer).not.toContain("小黄");
    const run = model
      .lora({ r: 16, alpha: 32 })
      .dataset(qwen.datasets.selfCognition({ name: "小黄", author: "魔搭", languages: ["zh"] }))
      .maxLength(64)
      .batchSize(8)
      .gradAccum(1)
      .maxSteps(20) // 20 steps at 4e-2 teach the name (at 2e-2 they do not); 60 at 1e-2 took three times as long
      .lr(4e-2)
      .schedule("cosine")
      .seed(3)
      .logEvery(5)
      .output(join(tmp, "selfcog"));
    expect(String(run)).toContain("LoRA r=16 alpha=32 on tiny-qwen2");
    tuned = await run.train();
    expect(tuned.status).toBe("completed");
    expect(tuned.adapter).toBe(join(tmp, "selfcog"));
    expect(tuned.losses.map((p) => p.step)).toEqual([5, 10, 15, 20]);
    expect(tuned.losses[3].loss).toBeLessThan(0.5 * tuned.losses[0].loss);
    expect(tuned.tokensPerSecond).toBeGreaterThan(0);
    // In a terminal: a line when the run starts, one per logged step, one at the end.
    const lines = sink.lines().filter((l) => l.startsWith("[train]"));
    expect(lines[0]).toMatch(/^\[train\] LoRA r=16 alpha=32 · tiny-qwen2 · selfCognition\(小黄, 魔搭\): 25 examples, 20 steps/);
    expect(lines.filter((l) => /^\[train\] step +\d+\/20 · epoch/.test(l))).toHaveLength(4);
    expect(lines[lines.length - 1]).toMatch(/^\[train\] done: 20 steps in .*; saved /);

    const withName = await model.withAdapter(tuned.adapter!).chat(WHO).greedy().maxTokens(24).quiet();
    expect(withName.text).toContain("小黄");
    expect(withName.model).toMatch(/^tiny-qwen2:fp32:cpu\+selfcog$/);
    // The base answers as before, with the adapter still loaded beside it.
    expect((await model.chat(WHO).greedy().maxTokens(24).quiet()).text).toBe(baseAnswer);
    // Plain peft in Python reads the saved folder and answers with the same tokens.
    expect(await peftGreedy(tuned.adapter!, WHO, 24)).toEqual(withName.tokenIds);
  });

  it("loads an adapter onto the model it was trained on, and folds it into a saved model", async () => {
    const view = await qwen.adapters.load(tuned.adapter!);
    expect(view.base.id).toBe(model.id);
    expect(view.info).toMatchObject({ name: "selfcog", r: 16, alpha: 32 });
    expect((await qwen.adapters.list(model)).map((a) => a.name)).toEqual(["selfcog"]);
    const viaView = await view.chat(WHO).greedy().maxTokens(24).quiet();

    const merge = tuned.merge();
    expect(merge).toBeInstanceOf(MergeRequest);
    expect(merge.adapters).toEqual([tuned.adapter]);
    expect(model.withAdapter(tuned).merge().adapters).toEqual([tuned.adapter]);
    await merge.save(join(tmp, "merged"), { quiet: true });
    const merged = await qwen.load(join(tmp, "merged"), { dtype: "fp32", device: "cpu", quiet: true });
    expect((await merged.chat(WHO).greedy().maxTokens(24).quiet()).tokenIds).toEqual(viaView.tokenIds);
    expect(await merged.unload()).toBeUndefined(); // nothing for a notebook cell to print
    expect(await view.unload()).toBeUndefined();
    expect(await qwen.adapters.list(model)).toEqual([]);
  });

  it("previews examples with the answer spans marked", async () => {
    const preview = await model.lora().dataset(ROWS.slice(0, 2), { format: "alpaca" }).quiet().preview(2);
    expect(preview.examples).toHaveLength(2);
    expect(preview.examples[0].segments.filter((s) => s.trained).map((s) => s.text)).toEqual(["回答0号<|im_end|>"]);
    expect(preview.text()).toContain("⟦回答1号<|im_end|>⟧");
    expect(preview.html()).toContain("回答0号&lt;|im_end|&gt;</span>");
    expect(String(preview)).toBe("TrainPreview(2 examples)");
  });

  it("resumes a cancelled run exactly where an uninterrupted one would be, step for step", async () => {
    const base = model
      .lora({ r: 4, dropout: 0.1 }) // dropout makes every step depend on the restored random state
      .dataset(ROWS)
      .maxLength(48)
      .batchSize(2)
      .gradAccum(2)
      .epochs(2)
      .lr(1e-3)
      .schedule("cosine", { warmup: 0.2 })
      .evalSplit(0.2)
      .evalEvery(2);
    const full = await base.output(join(tmp, "full")).quiet().train();
    expect(full.totalSteps).toBeGreaterThan(6);

    const abort = new AbortController();
    sink.when(/\[train\] step +1\//, () => abort.abort());
    const part = await base.output(join(tmp, "part")).train({ signal: abort.signal });
    expect(part.status).toBe("cancelled");
    expect(part.step).toBeLessThan(full.totalSteps);
    expect(part.adapter).toBe(join(tmp, "part", `checkpoint-${part.step}`));
    expect(sink.lines()).toContain(`[train] cancelled at step ${part.step}/${full.totalSteps}; last checkpoint ${part.adapter} (continue with .resume(...))`);

    const rest = await base.resume(part.lastCheckpoint!).quiet().train();
    expect(rest.status).toBe("completed");
    expect(rest.resumedFrom).toBe(part.lastCheckpoint);
    expect(rest.outputDir).toBe(join(tmp, "part"));
    const pairs = (r: TrainResult) => r.losses.map((p) => [p.step, p.loss, p.lr]);
    expect(rest.losses.map((p) => p.step)).toEqual(full.losses.map((p) => p.step));
    pairs(rest).forEach((p, i) => p.forEach((x, j) => expect(x).toBeCloseTo(pairs(full)[i][j], 5)));
    rest.evals.forEach((e, i) => expect(e.loss).toBeCloseTo(full.evals[i].loss, 5));
  });

  it("keeps other models free during a run, holds its own model's chat, and cancels into a loadable checkpoint", async () => {
    const other = await qwen.load(tinyModel(), { dtype: "bf16", device: "cpu", quiet: true });
    expect(other.id).not.toBe(model.id);
    const started = new Promise<void>((resolve) => sink.when(/\[train\] step +1\/100000/, resolve));
    const abort = new AbortController();
    let trained = false;
    const running = model.lora({ r: 4 }).dataset(ROWS).maxLength(48).batchSize(2).maxSteps(100_000).output(join(tmp, "long")).train({ signal: abort.signal });
    void running.then(() => (trained = true));
    await started;

    const elsewhere = await other.chat(WHO).greedy().maxTokens(4).quiet();
    expect(elsewhere.completionTokens).toBe(4);
    expect(trained).toBe(false);
    let sameDone = false;
    const same = model.chat(WHO).greedy().maxTokens(4).quiet().then((r) => ((sameDone = true), r));
    // The chat reaches the worker a moment after it is asked for; it then waits there behind the run.
    let inWorker = (await qwen.status()).running;
    for (let tries = 0; tries < 50 && inWorker.length < 2; tries++) inWorker = (await qwen.status()).running;
    expect(inWorker.map((r) => r.type).sort()).toEqual(["generate", "train"]);
    expect(sameDone).toBe(false);
    expect(trained).toBe(false);

    abort.abort();
    const result = await running;
    expect(result.status).toBe("cancelled");
    expect(result.step).toBeLessThan(100_000);
    expect(existsSync(join(result.lastCheckpoint!, "adapter_config.json"))).toBe(true);
    expect((await same).text).toBe((await model.chat(WHO).greedy().maxTokens(4).quiet()).text);
    // The checkpoint a cancel leaves is an adapter the model can answer with.
    expect((await model.withAdapter(result).chat(WHO).greedy().maxTokens(4).quiet()).completionTokens).toBeGreaterThan(0);
    await other.unload();
  });

  it("refuses options that cannot work in the builder, before anything is sent", () => {
    const run = model.lora();
    expect(() => run.batchSize(0)).toThrow(new RangeError("batchSize(n) must be at least 1, got 0 (rows per forward pass)"));
    expect(() => run.evalSplit(1.5)).toThrow(/evalSplit\(fraction\) must be a fraction below 1 .* got 1\.5/);
    expect(() => run.lr(0)).toThrow(/lr\(rate\) must be greater than 0, got 0/);
    expect(() => run.lr(-1e-4)).toThrow(RangeError);
    expect(() => model.lora({ rank: 8 } as never)).toThrow(/lora\(options\) has no option "rank"; known options: r, alpha, dropout, targets/);
    expect(() => run.schedule("step" as never)).toThrow(/schedule\(name\) must be one of "cosine", "linear", "constant"/);
    expect(() => run.warmup(1.5)).toThrow(/whole number of steps/);
    expect(() => run.dataset(join(tmp, "nope.json"))).toThrow(/Dataset file not found: .*nope\.json/);
    expect(() => run.dataset([])).toThrow(/empty list/);
    expect(() => run.dataset(ROWS, { samples: 0 })).toThrow(/dataset option samples must be at least 1/);
    expect(() => run.resume(join(tmp, "no-run"))).toThrow(/No checkpoint at/);
  });

  it("reports dataset and option errors from the worker with file, row and field, before training starts", async () => {
    // .dataset() checks a file's first rows itself (kernel dataset-rows.ts); the worker checks every row, so
    // the bad rows here come after the ones .dataset() reads.
    const good = Array.from({ length: 30 }, (_, i) => JSON.stringify({ instruction: `q${i}`, output: `a${i}` }));
    const bad = join(tmp, "bad.jsonl");
    writeFileSync(bad, [...good, "{oops}"].join("\n") + "\n");
    const missing = join(tmp, "missing.jsonl");
    writeFileSync(missing, [...good, '{"instruction": "c"}'].join("\n") + "\n");
    const before = sink.lines().length;
    const attempt = async (run: ReturnType<Model["lora"]>) => {
      const error = await run.output(join(tmp, "refused")).train().then(() => undefined, (e: unknown) => e);
      expect(error).toBeInstanceOf(Error);
      return error as Error;
    };
    const json = await attempt(model.lora().dataset(bad));
    expect(json).toBeInstanceOf(WorkerError);
    expect(json.message).toMatch(/DatasetError: .*bad\.jsonl, row 31: line 31 is not valid JSON/);
    const field = await attempt(model.lora().dataset(missing));
    expect(field.message).toMatch(/missing\.jsonl, row 31, field "output": is missing/);
    const target = await attempt(model.lora({ targets: ["q_proj", "qkv"] }).dataset(ROWS));
    expect(target.message).toMatch(/unknown LoRA target module\(s\) \['qkv'\]; this model's linear modules are: .*q_proj.*v_proj/);
    const evalEvery = await attempt(model.lora().dataset(ROWS).evalEvery(5));
    expect(evalEvery.message).toMatch(/evalEvery\(5\) needs rows to evaluate on: add \.evalSplit\(0\.1\)/);
    const empty = await attempt(model.lora());
    expect(empty.message).toMatch(/This run has no data/);
    // Nothing started: no progress line, no run folder.
    expect(sink.lines().slice(before).filter((l) => l.startsWith("[train]"))).toEqual([]);
    expect(existsSync(join(tmp, "refused"))).toBe(false);
  });
});
