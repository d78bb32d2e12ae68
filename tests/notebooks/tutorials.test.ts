// Runs the tutorial notebooks top to bottom in quick mode on the tiny model, as a workshop would
// run them on a GPU, and checks what each cell left behind: the chat widgets, training dashboards and
// memory gauges in their final state (nbclient applies update_display_data in place).
import { spawn, spawnSync } from "node:child_process";
import { cpSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { cellWith, errorsOf, executeNotebookAsync, repo, sourceOf, streamText, type Cell, type ExecutedNotebook } from "./notebook-runner";

const CHAT = "application/vnd.qwenbook.chat+json";
const TRAIN = "application/vnd.qwenbook.train+json";
const GPU = "application/vnd.qwenbook.gpu+json";

interface ChatWidget {
  state: string;
  messages: Array<{ role: string; content: string; reasoning?: string; toolCalls?: unknown[] }>;
  /** A conversation's turns before this one (folded behind "N earlier turns"). */
  earlier?: Array<{ role: string; content: string }>;
}
interface TrainWidget {
  state: string;
  train: { step: number[]; loss: Array<number | null> };
}
interface GpuWidget {
  devices: Array<{ device: string; used: number; total: number }>;
}

// The notebooks write runs/ and out/ next to themselves; a copy inside the repository (so packages
// still resolve from its node_modules) keeps a user's real runs in notebooks/ from being overwritten.
const workRoot = join(repo, ".qwenbook");
mkdirSync(workRoot, { recursive: true });
const workDir = mkdtempSync(join(workRoot, "tutorials-"));
cpSync(join(repo, "notebooks", "data"), join(workDir, "data"), { recursive: true });
for (const f of readdirSync(join(repo, "notebooks")).filter((n) => n.endsWith(".ipynb"))) {
  cpSync(join(repo, "notebooks", f), join(workDir, f));
}

afterAll(() => {
  spawnSync("node", [join(repo, "kernel", "dist", "cli", "main.js"), "worker", "stop"], { stdio: "inherit" });
  rmSync(workDir, { recursive: true, force: true });
});

const env = { QWENBOOK_QUICK: "1", QWENBOOK_MODEL: process.env.QWENBOOK_TINY_MODEL ?? "" };

function widgets<T>(cell: Cell, mime: string): T[] {
  return (cell.outputs ?? []).filter((o) => o.data?.[mime] !== undefined).map((o) => o.data![mime] as T);
}

/** Cells that await a chat into the cell (not quiet, not a stream for program use). */
function chatCells(nb: ExecutedNotebook): Cell[] {
  return nb.cells.filter((c) => {
    const src = sourceOf(c);
    return c.cell_type === "code" && /\.(chat|say)\(/.test(src) && !/\.quiet\(\)|\.stream\(\)/.test(src);
  });
}

/** Code cells matching `pattern`, less those that run only against a Ray cluster (none in CI). */
function codeCells(nb: ExecutedNotebook, pattern: RegExp): Cell[] {
  return nb.cells.filter((c) => c.cell_type === "code" && pattern.test(sourceOf(c)) && !sourceOf(c).startsWith("if (process.env.RAY_ADDRESS)"));
}

/** A notebook run can take minutes on a busy machine (the config's hook limit is for quicker setups). */
const RUN_TIMEOUT_MS = 900_000;
const emptyNotebook = (): ExecutedNotebook => ({ cells: [], seconds: 0, stderr: "", status: null });

const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;

/** Runs `name` in quick mode (on the tiny Qwen2, or on `model`) and checks what every tutorial must show, then `extra`. */
function checkNotebook(name: string, extra: (nb: ExecutedNotebook) => void, model?: string): void {
  describe(`notebooks/${name} (quick mode)`, () => {
    // Filled by beforeAll: the notebooks run one after another, each when vitest reaches its block.
    const nb = emptyNotebook();
    beforeAll(() => executeNotebookAsync(name, model ? { ...env, QWENBOOK_MODEL: model } : env, workDir, nb), RUN_TIMEOUT_MS);

    it("runs top to bottom without errors", () => {
      console.log(`${name}: ${nb.seconds} s`);
      expect(errorsOf(nb), nb.stderr).toEqual([]);
      const stderr = nb.cells.flatMap((c) => (c.outputs ?? []).filter((o) => o.output_type === "stream" && o.name === "stderr"));
      expect(stderr, "cells wrote to stderr").toEqual([]);
      expect(nb.status, nb.stderr).toBe(0);
      expect(nb.seconds).toBeGreaterThan(0);
    });

    it("shows each awaited chat as a finished chat widget with a reply", () => {
      const cells = chatCells(nb);
      expect(cells.length).toBeGreaterThan(0);
      for (const cell of cells) {
        const chats = widgets<ChatWidget>(cell, CHAT);
        expect(chats.length, `no chat widget in: ${sourceOf(cell)}`).toBeGreaterThan(0);
        for (const chat of chats) {
          expect(chat.state, sourceOf(cell)).toBe("done");
          const last = chat.messages[chat.messages.length - 1];
          expect(last.role).toBe("assistant");
          // A reply may be all thinking or only calls; it must have something.
          const said = last.content.trim() || last.reasoning?.trim() || (last.toolCalls?.length ? "calls" : "");
          expect(said.length, `empty reply in: ${sourceOf(cell)}`).toBeGreaterThan(0);
        }
      }
    });

    it("draws a memory gauge wherever the notebook shows one", () => {
      for (const cell of codeCells(nb, /qwen\.gpu\(|\.train\(\)/)) {
        const gauges = widgets<GpuWidget>(cell, GPU);
        expect(gauges.length, `no memory gauge in: ${sourceOf(cell)}`).toBeGreaterThan(0);
        const device = gauges[gauges.length - 1].devices[0];
        expect(device.used).toBeGreaterThan(0);
        expect(device.total).toBeGreaterThan(device.used);
      }
    });

    extra(nb);
  });
}

/** Every training cell ends in a finished dashboard whose loss falls: last quarter below the first. */
function checkTraining(nb: ExecutedNotebook): void {
  it("trains to the end with a falling loss in the dashboard", () => {
    const cells = codeCells(nb, /\.train\(\)/);
    expect(cells.length).toBeGreaterThan(0);
    for (const cell of cells) {
      const runs = widgets<TrainWidget>(cell, TRAIN);
      expect(runs.length, `no training dashboard in: ${sourceOf(cell)}`).toBe(1);
      const [run] = runs;
      expect(run.state).toBe("done");
      const losses = run.train.loss.filter((x): x is number => x !== null);
      expect(losses.length).toBe(run.train.step.length);
      expect(losses.length).toBeGreaterThanOrEqual(4);
      const q = Math.floor(losses.length / 4);
      expect(mean(losses.slice(-q)), `loss did not fall: ${losses.join(", ")}`).toBeLessThan(mean(losses.slice(0, q)));
    }
  });
}

checkNotebook("01-chat.ipynb", (nb) => {
  it("kept the conversation's history", () => {
    const chats = widgets<ChatWidget>(cellWith(nb, "What is my name"), CHAT);
    // The third turn shows itself; the system prompt and the two turns before it travel folded in `earlier`.
    expect(chats[0].messages.map((m) => m.role)).toEqual(["user", "assistant"]);
    expect((chats[0].earlier ?? []).map((m) => m.role)).toEqual(["system", "user", "assistant", "user", "assistant"]);
  });
});

checkNotebook("02-lora-role-play.ipynb", (nb) => {
  checkTraining(nb);
  it("previews the template with the trained spans marked", () => {
    expect(JSON.stringify(cellWith(nb, "run.preview(").outputs)).toContain("⟦");
  });
  it("reported the run to TensorBoard and printed where to point it", () => {
    expect(streamText(cellWith(nb, "result.tensorboardCommand"))).toMatch(/^tensorboard --logdir \S*runs\/huanhuan\/runs\n/);
  });
});

checkNotebook("03-self-cognition.ipynb", (nb) => {
  checkTraining(nb);
  it("served the merged model and streamed a reply through the official openai client", () => {
    const output = streamText(cellWith(nb, "for await (const chunk of stream)"));
    const streamed = /\((\d+) characters streamed\)/.exec(output);
    expect(Number(streamed?.[1]), output).toBeGreaterThan(0);
    // the pieces were printed as they arrived, before the count and its leading newline
    expect(output.slice(0, streamed!.index).replace(/\n$/, "").length, output).toBeGreaterThan(0);
    expect(streamText(cellWith(nb, "client.models.list()"))).toContain("xiaohuang");
    // the streamed chat went through the server that the notebook started
    expect(streamText(cellWith(nb, "server.stats()"))).toMatch(/requests: [1-9]/);
  });
});

checkNotebook("04-qlora-fast.ipynb", (nb) => {
  checkTraining(nb);
  it("trained on an int4 base and wrote a 16-bit merge and a GGUF file", () => {
    expect(JSON.stringify(cellWith(nb, 'quant: "int4"').outputs)).toContain("int4");
    const merged = JSON.stringify(cellWith(nb, "qlora-merged-16bit").outputs);
    expect(merged).toContain("safetensors →");
    expect(merged).not.toContain("safetensors-int4");
    expect(JSON.stringify(cellWith(nb, "qlora-q8_0.gguf").outputs)).toContain("gguf-q8_0");
  });
});

checkNotebook("05-multiturn-merge-quantize.ipynb", (nb) => {
  checkTraining(nb);
  it("compared the formats and ran the GGUF file in llama.cpp", () => {
    const table = streamText(cellWith(nb, "console.table(\n  comparison"));
    for (const format of ["safetensors int8", "safetensors int4 (GPTQ)", "GGUF q8_0", "GGUF q4_0"]) expect(table).toContain(format);
    expect(JSON.stringify(cellWith(nb, "barChart(").outputs)).toContain("<svg");
    expect(streamText(cellWith(nb, "run-gguf.mjs"))).toMatch(/^llama\.cpp \(.+\), [1-9]\d* tokens/);
    // everything the notebook loaded was unloaded again
    expect(streamText(cellWith(nb, "(await qwen.status()).models"))).not.toContain("multiturn");
  });
});

checkNotebook("06-several-gpus.ipynb", (nb) => {
  checkTraining(nb);
  it("trained on two ranks with DDP and with FSDP2, the dashboards saying so", () => {
    for (const [pattern, strategy] of [[/\.strategy\("ddp"\)/, "ddp"], [/\.strategy\("fsdp"\)/, "fsdp"]] as const) {
      const [cell] = codeCells(nb, pattern);
      const run = widgets<TrainWidget & { config: Record<string, unknown> }>(cell, TRAIN)[0];
      expect(run.config).toMatchObject({ ranks: 2, strategy });
      // The gauge beside it has a dial for each rank.
      const gauge = widgets<GpuWidget>(cell, GPU).at(-1)!;
      expect(gauge.devices.map((d) => d.device)).toEqual(expect.arrayContaining(["rank 0 · cpu", "rank 1 · cpu"]));
    }
    expect(streamText(cellWith(nb, "No RAY_ADDRESS"))).toContain("No RAY_ADDRESS");
    expect(streamText(cellWith(nb, "(await qwen.status()).models"))).not.toContain("fsdp");
  });
});

checkNotebook("08-preference.ipynb", (nb) => {
  checkTraining(nb);
  it("previews each pair's chosen and rejected answers with the scored spans marked", () => {
    const shown = JSON.stringify(cellWith(nb, "run.preview(").outputs);
    expect(shown).toContain("[chosen · ");
    expect(shown).toContain("[rejected · ");
    expect(shown).toContain("⟦");
  });
  it("drew the DPO rewards and accuracy beside the loss, starting from the SFT adapter as reference", () => {
    const [run] = widgets<TrainWidget & { train: { metrics?: Record<string, Array<number | null>> } }>(cellWith(nb, "await run.train()"), TRAIN);
    const metrics = run!.train.metrics!;
    expect(Object.keys(metrics)).toEqual(expect.arrayContaining(["rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/accuracies"]));
    // Step 1 scores the SFT adapter against itself: the reference, so no margin yet.
    expect(metrics["rewards/margins"]![0]).toBe(0);
    expect(metrics["rewards/margins"]!.at(-1)).toBeGreaterThan(0);
    expect(streamText(cellWith(nb, "result.preferenceCurve"))).toMatch(/DPO margin/);
    expect(streamText(cellWith(nb, 'readdirSync("runs/huanhuan-dpo")'))).toContain("reference_logps.json");
  });
});

checkNotebook(
  "07-qwen3-agent.ipynb",
  (nb) => {
    it("asked with thinking on and off, side by side", () => {
      const cell = cellWith(nb, ".thinking(false)");
      expect(widgets<ChatWidget>(cell, CHAT)).toHaveLength(2);
      const table = streamText(cellWith(nb, "console.table([\n  { thinking"));
      expect(table).toMatch(/'on'[\s\S]*'off'/);
    });

    it("ran its tools without eval, refusing what is not arithmetic", () => {
      const out = streamText(cellWith(nb, "function calculate("));
      expect(out).toContain("276 25 512");
      expect(out).toContain("pricePer100g: 88");
      expect(out).toContain('refused: unexpected "p" in "process.exit(1)"');
      expect(out).toContain('refused: division by zero in "1 / 0"');
    });

    it("ended the agent loop saying how it ended", () => {
      const out = streamText(cellWith(nb, "for (let round = 1; ; round++)"));
      // A random tiny model rarely calls a tool; the loop says so rather than pretending.
      expect(out).toMatch(/The model answered without calling a tool\.|Answered after \d+ tool call|Stopped after \d+ rounds/);
    });
  },
  join(repo, ".qwenbook", "models", "tiny-qwen3"),
);

/**
 * The agent loop's tool path, which a random tiny model never takes: the tiny Qwen3 fine-tuned (by
 * python-bridge/tests/tool_model.py --spec) to answer the tutorial's first agent prompt with a lookup_tea call. The
 * prompt's system text, task and tools are read out of the notebook, so the model learns the prompt it will get.
 */
function agentPrompt(): { messages: object[]; tools: object[] } {
  const nb = JSON.parse(readFileSync(join(repo, "notebooks", "07-qwen3-agent.ipynb"), "utf8")) as { cells: Cell[] };
  const source = (needle: string) => nb.cells.map(sourceOf).find((src) => src.includes(needle)) ?? "";
  const shop = JSON.parse(readFileSync(join(repo, "notebooks", "data", "tea-shop.json"), "utf8")) as object;
  const toolsSrc = /const tools = (\[[\s\S]*?\n\]);/.exec(source("const tools = ["))?.[1];
  const agentSrc = source("const agent = m.conversation(");
  const system = /system: (`[^`]*`)/.exec(agentSrc)?.[1];
  const task = /const task = ("[^"]*");/.exec(agentSrc)?.[1];
  if (!toolsSrc || !system || !task) throw new Error("07-qwen3-agent.ipynb no longer has the tools, system or task this test reads");
  const evaluate = (expr: string) => new Function("shop", `return ${expr};`)(shop) as unknown;
  return {
    messages: [{ role: "system", content: evaluate(system) }, { role: "user", content: evaluate(task) }],
    tools: evaluate(toolsSrc) as object[],
  };
}

function toolCallingQwen3(): Promise<string> {
  const out = join(workDir, "tiny-qwen3-tea-agent");
  const spec = join(workDir, "tea-agent-spec.json");
  const reply = '<think>\nLook up Longjing first.\n</think>\n\n<tool_call>\n{"name": "lookup_tea", "arguments": {"tea": "longjing"}}\n</tool_call>';
  writeFileSync(spec, JSON.stringify({ ...agentPrompt(), reply }));
  const python = process.env.QWENBOOK_PYTHON ?? join(repo, ".venv", "bin", "python");
  const script = join(repo, "python-bridge", "tests", "tool_model.py");
  const child = spawn(python, [script, "--spec", spec, join(repo, ".qwenbook", "models", "tiny-qwen3"), out], {
    cwd: repo,
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr.on("data", (d: Buffer) => (stderr = (stderr + d.toString()).slice(-5000)));
  return new Promise((resolve, reject) => {
    child.once("error", reject);
    child.once("close", (code, signal) => (code === 0 ? resolve(out) : reject(new Error(`tool_model.py failed (exit ${code ?? signal}):\n${stderr}`))));
  });
}

// Started at collection, so the model trains while the notebooks above run; only the last block waits for it.
const toolModel = toolCallingQwen3();
toolModel.catch(() => undefined); // reported by the block that awaits it

describe("notebooks/07-qwen3-agent.ipynb on a model that calls a tool (quick mode)", () => {
  const nb = emptyNotebook();
  beforeAll(async () => {
    await executeNotebookAsync("07-qwen3-agent.ipynb", { ...env, QWENBOOK_MODEL: await toolModel }, workDir, nb);
  }, RUN_TIMEOUT_MS);

  it("runs the call, says the result back and ends the loop after it", () => {
    expect(errorsOf(nb), nb.stderr).toEqual([]);
    const loop = cellWith(nb, "for (let round = 1; ; round++)");
    const out = streamText(loop);
    expect(out).toContain('round 1: lookup_tea({"tea":"longjing"}) → {"id":"longjing","name":"Longjing · 龙井"');
    expect(out).toContain('"pricePer100g":88');
    expect(out).toMatch(/Answered after 1 tool call\(s\) in 1 round\(s\)\.|round 2: /);
    const turns = widgets<ChatWidget & { messages: Array<{ role: string; name?: string }> }>(loop, CHAT);
    expect(turns[0].messages.at(-1)?.toolCalls).toEqual([{ name: "lookup_tea", arguments: { tea: "longjing" } }]);
    expect(turns[0].messages.at(-1)?.reasoning).toBe("Look up Longjing first.");
    expect(turns[1].messages[0]).toMatchObject({ role: "tool", name: "lookup_tea" });
    expect(JSON.parse(turns[1].messages[0].content)).toMatchObject({ id: "longjing", pricePer100g: 88 });
  });
});
