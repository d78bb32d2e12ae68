// Fine-tuning in the "Qwen (TypeScript)" kernel, driven by Jupyter's own client: the builder prints
// its config, the preview renders, training draws one dashboard updated in place by display id that
// ends done, paths resolve against the notebook's folder, and the interrupt button cancels a run into
// a checkpoint whose result the next cell can still read.
import { existsSync, mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CHAT_MIME, GPU_MIME, TRAIN_MIME, type TrainBundle } from "../../kernel/src/display/bundles";
import { Qwen } from "../../kernel/src/index";
import { privateRuntimeDir, runCli, tinyModel } from "./helpers";
import { drive as driveKernel, type CellCode, type CellResult } from "./kernel-harness";


const prefix = mkdtempSync(join(tmpdir(), "qwenbook-train-kernel-prefix-"));
const notebookDir = mkdtempSync(join(tmpdir(), "qwenbook-train-notebook-"));
let cells: CellResult[];

const drive = (code: CellCode[]): Promise<CellResult[]> => driveKernel(prefix, notebookDir, code);

/** The train dashboards of a cell: one output shown once, then updated in place under its display id. */
function dashboard(cell: CellResult): TrainBundle[] {
  const shown = cell.displays.filter((d) => TRAIN_MIME in d.data);
  expect(shown.length).toBeGreaterThan(1);
  const [first, ...updates] = shown;
  expect(first.msg_type).toBe("display_data");
  expect(first.display_id).toEqual(expect.any(String));
  for (const u of updates) expect(u).toMatchObject({ msg_type: "update_display_data", display_id: first.display_id });
  for (const d of shown) expect(d.data["text/plain"]).toEqual(expect.any(String));
  return shown.map((d) => d.data[TRAIN_MIME] as TrainBundle);
}

beforeAll(async () => {
  privateRuntimeDir("train-kernel");
  const install = runCli("kernelspec", "install", "--prefix", prefix);
  expect(install.status, install.stderr).toBe(0);
  mkdirSync(join(notebookDir, "data"));
  const rows = Array.from({ length: 16 }, (_, i) => ({ instruction: `问题${i}`, input: "", output: `回答${i}号` }));
  writeFileSync(join(notebookDir, "data", "rows.json"), JSON.stringify(rows));
  const tiny = JSON.stringify(tinyModel());
  cells = await drive([
    {
      code:
        `import { qwen } from "qwenbook";\nconst m = await qwen.load(${tiny}, { quiet: true });\n` +
        'const run = m.lora({ r: 8, alpha: 16 }).dataset("data/rows.json", { format: "alpaca" }).maxLength(48).batchSize(4)' +
        '.gradAccum(1).epochs(3).lr(5e-3).schedule("cosine", { warmup: 0.1 }).evalSplit(0.25).evalEvery(3).output("runs/rows");\nrun',
    },
    { code: "await run.preview(2);" },
    { code: "const result = await run.train();\nresult" },
    { code: 'const tuned = await m.withAdapter(result.adapter).chat("问题1").greedy().maxTokens(8);\ntuned.model' },
    { code: 'const long = m.lora({ r: 4 }).dataset("data/rows.json").maxSteps(100000).output("runs/long");' },
    { code: "await long.train();", interrupt_after_output: true },
    { code: "String(await long.result)" },
  ]);
});

afterAll(async () => {
  await new Qwen().shutdown();
});

describe("fine-tuning in the Qwen (TypeScript) kernel", () => {
  it("shows the run's configuration when the builder is a cell's value", () => {
    expect(cells[0].errors).toEqual([]);
    expect(cells[0].stream).toContain("TrainRun(LoRA r=8 alpha=16 on tiny-qwen2");
    expect(cells[0].stream).toContain("datasets: rows.json (alpaca)");
    expect(cells[0].stream).toContain("output: runs/rows");
  });

  it("renders the preview with the answers marked, as text and HTML", () => {
    expect(cells[1].errors).toEqual([]);
    const [preview] = cells[1].displays;
    expect(preview.data["text/plain"]).toContain("⟦回答0号<|im_end|>⟧");
    expect(preview.data["text/html"]).toContain('title="trained">回答1号&lt;|im_end|&gt;</span>');
  });

  it("draws the training dashboard, updated in place, ending done with the loss curve, beside a memory gauge", () => {
    expect(cells[2].errors).toEqual([]);
    const bundles = dashboard(cells[2]);
    expect(bundles[0]).toMatchObject({ state: "running", progress: { step: 0, totalSteps: 9 } });
    const last = bundles[bundles.length - 1];
    expect(last.state).toBe("done");
    expect(last.train.step).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9]);
    expect(last.train.loss.every((l) => typeof l === "number")).toBe(true);
    expect(last.eval?.step).toEqual([3, 6, 9]);
    expect(last.config).toMatchObject({ method: "lora", r: 8, alpha: 16, maxLength: 48, output: "runs/rows" });
    expect(last.checkpoint).toBe("runs/rows");
    expect(cells[2].displays.some((d) => GPU_MIME in d.data)).toBe(true);
    // Relative paths are the notebook's: the adapter landed next to it.
    expect(existsSync(join(notebookDir, "runs", "rows", "adapter_config.json"))).toBe(true);
    // The dashboard ended "done": the awaited result is not printed again under it.
    expect(cells[2].stream.trim()).toBe("");
  });

  it("chats with the trained adapter, written as in the README", () => {
    expect(cells[3].errors).toEqual([]);
    expect(cells[3].stream.trim()).toMatch(/^'?tiny-qwen2:[^ ]+\+rows'?$/);
    expect(cells[3].displays.some((d) => CHAT_MIME in d.data)).toBe(true);
  });

  it("cancels a run on interrupt: the dashboard ends cancelled at its checkpoint, and the result stays readable", () => {
    expect(cells[5].status).toBe("error");
    const last = dashboard(cells[5]).pop()!;
    expect(last.state).toBe("cancelled");
    expect(last.checkpoint).toMatch(/^runs\/long\/checkpoint-\d+$/);
    expect(existsSync(join(notebookDir, last.checkpoint!, "adapter_config.json"))).toBe(true);
    expect(cells[6].errors).toEqual([]);
    expect(cells[6].stream).toMatch(/TrainResult\(cancelled, step \d+\/100000, .*adapter runs\/long\/checkpoint-\d+\)/);
  });
});
