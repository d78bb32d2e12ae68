// Preference tuning through a real worker and the tiny model: an SFT adapter, then DPO that continues it
// (m.withAdapter(sft).preference(...)), with its preview, the live metrics in the progress lines, the
// result, trainer_state.json and the TensorBoard events, and a bad row refused before anything runs.
import { existsSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Qwen, type Model } from "../../kernel/src/index";
import { privateRuntimeDir, recordingSink, tinyModel } from "./helpers";

const CHOSEN = "春花秋月夜宫";
const REJECTED = "山水风云雷电";
const pick = (letters: string, i: number) => Array.from({ length: 4 }, (_, k) => letters[(i * 7 + k * 3) % letters.length]).join("");
const PAIRS = Array.from({ length: 8 }, (_, i) => ({ prompt: `第${i}问`, chosen: pick(CHOSEN, i), rejected: pick(REJECTED, i) }));

const tmp = mkdtempSync(join(tmpdir(), "qwenbook-preference-"));
const pairsFile = join(tmp, "pairs.jsonl");
writeFileSync(pairsFile, PAIRS.map((p) => JSON.stringify(p, null, 0)).join("\n") + "\n");
let sink: ReturnType<typeof recordingSink>;
let qwen: Qwen;
let model: Model;

beforeAll(async () => {
  privateRuntimeDir("preference");
  sink = recordingSink();
  qwen = new Qwen({ sink });
  model = await qwen.load(tinyModel(), { dtype: "fp32", device: "cpu", quiet: true });
});

afterAll(async () => {
  await qwen?.shutdown();
});

describe("preference tuning through a real worker", () => {
  it("runs DPO on an SFT adapter, which starts it and is its reference, with the metrics everywhere", async () => {
    const sft = await model
      .lora({ r: 8 })
      .dataset(PAIRS.map((p) => ({ instruction: p.prompt, output: p.rejected })))
      .maxLength(48).batchSize(8).gradAccum(1).maxSteps(6).lr(1e-2)
      .output(join(tmp, "sft"))
      .quiet()
      .train();
    const run = model.withAdapter(sft).preference({ method: "dpo", beta: 0.1 }).dataset(pairsFile)
      .maxLength(48).batchSize(4).gradAccum(1).maxSteps(8).lr(5e-3).schedule("constant")
      .report("tensorboard")
      .output(join(tmp, "dpo"));

    const preview = await run.quiet().preview(1);
    const scored = (side: "chosen" | "rejected") => preview.pairs[0]![side].segments.filter((s) => s.trained).map((s) => s.text).join("");
    expect(scored("chosen")).toContain(PAIRS[0]!.chosen);
    expect(scored("rejected")).toContain(PAIRS[0]!.rejected);
    expect(preview.pairs[0]!.chosen.segments[0]).toMatchObject({ trained: false });

    const result = await run.train();
    const lines = sink.out.join("").split("\n").filter((l) => l.startsWith("[train] step"));
    expect(lines).toHaveLength(8);
    // Step 1 runs the SFT adapter itself against the stored reference: margin 0, so it is the reference.
    expect(lines[0]).toMatch(/margin 0\.000 · accuracy 0\.00/);
    expect(lines[7]).toMatch(/accuracy 1\.00/);
    expect(result.preference).toBe("dpo");
    expect(result.finalMetrics["rewards/accuracies"]).toBe(1);
    expect(result.finalMetrics["rewards/margins"]).toBeGreaterThan(0.5);
    expect(result.preferenceCurve["rewards/margins"]).toHaveLength(8);
    const state = JSON.parse(readFileSync(join(tmp, "dpo", "trainer_state.json"), "utf8")) as { log_history: Array<Record<string, number>> };
    expect(state.log_history.at(-1)!["rewards/margins"]).toBeCloseTo(result.finalMetrics["rewards/margins"]!, 6);
    expect(existsSync(join(tmp, "dpo", "reference_logps.json"))).toBe(true);
    expect(readdirSync(join(tmp, "dpo", "runs"))).toHaveLength(1);
    const tuned = await model.withAdapter(result).chat(PAIRS[0]!.prompt).greedy().maxTokens(4).quiet();
    expect(typeof tuned.text).toBe("string");
  }, 120_000);

  it("refuses a bad pair by file, row and field before anything is sent, and an SFT row with a pointer", () => {
    const bad = join(tmp, "bad.jsonl");
    writeFileSync(bad, [JSON.stringify(PAIRS[0]), JSON.stringify({ prompt: "q", chosen: "a" })].join("\n"));
    expect(() => model.preference().dataset(bad)).toThrow(`${bad}, row 2, field "rejected": is missing`);
    expect(() => model.preference().dataset([{ instruction: "q", output: "a" }] as never)).toThrow(/supervised rows/);
  });
});
