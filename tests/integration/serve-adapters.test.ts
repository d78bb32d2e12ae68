// m.serve({ adapters, memoryUtilization }) through a real worker with the tiny model: two LoRA adapters served by
// name beside the base model answer exactly as the notebook's chat with that adapter does, /v1/models lists them,
// and the Server reports them and the engine's cache.
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Qwen, type Model, type Server } from "../../kernel/src/index";
import { privateRuntimeDir, recordingSink, runPythonJson, tinyModel } from "./helpers";

const QUESTION = "Write a haiku about the sea.";

let qwen: Qwen;
let model: Model;
let server: Server;
let adapters: Record<string, string>;

/** Two adapters with random non-zero weights on different projections, written with plain peft. */
async function writeAdapters(): Promise<Record<string, string>> {
  const root = mkdtempSync(join(tmpdir(), "serve-adapters-"));
  const script = [
    "import json, sys, torch",
    "from peft import LoraConfig, get_peft_model",
    "from transformers import AutoModelForCausalLM",
    "out = {}",
    "for seed, name, targets in ((1, 'huanhuan', ['q_proj', 'v_proj']), (2, 'zhenhuan', ['up_proj', 'down_proj'])):",
    "    torch.manual_seed(seed)",
    "    m = AutoModelForCausalLM.from_pretrained(sys.argv[1])",
    "    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)",
    "    get_peft_model(m, cfg).save_pretrained(f'{sys.argv[2]}/{name}')",
    "    out[name] = f'{sys.argv[2]}/{name}'",
    "print(json.dumps(out))",
  ].join("\n");
  return runPythonJson<Record<string, string>>(["-c", script, tinyModel(), root], { OMP_NUM_THREADS: "1" });
}

async function chat(name: string): Promise<{ status: number; content?: string; model?: string }> {
  const res = await fetch(`${server.url}/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ model: name, messages: [{ role: "user", content: QUESTION }], max_tokens: 16, temperature: 0, repetition_penalty: 1 }),
  });
  const body = (await res.json()) as { model?: string; choices?: { message: { content: string } }[] };
  return { status: res.status, content: body.choices?.[0]?.message.content, model: body.model };
}

beforeAll(async () => {
  privateRuntimeDir("serve-adapters");
  const written = writeAdapters();
  qwen = new Qwen({ sink: recordingSink() });
  model = await qwen.load(tinyModel(), { dtype: "fp32", device: "cpu", quiet: true });
  adapters = await written;
  server = await model.serve({ port: 0, name: "tiny", adapters, memoryUtilization: 0.5 });
});

afterAll(async () => {
  await server?.stop();
  await qwen?.shutdown();
});

describe("m.serve({ adapters }) through a real worker", () => {
  it("reports the adapters and the engine's cache", async () => {
    expect(server.adapters).toEqual(adapters);
    const stats = await server.stats();
    expect(stats.adapters).toEqual(["huanhuan", "zhenhuan"]);
    expect(stats.cache).toMatchObject({ memoryUtilization: 0.5, blocksUsed: 0 });
    expect(stats.cache!.blocksTotal).toBeGreaterThan(0);
    expect(stats.cache!.cacheBytes).toBeGreaterThan(0);
    expect(String(server)).toContain(`adapters "huanhuan" (${adapters.huanhuan}), "zhenhuan" (${adapters.zhenhuan})`);
  });

  it("lists the base model then each adapter with its parent and folder", async () => {
    const { data } = (await (await fetch(`${server.url}/models`)).json()) as { data: { id: string; parent?: string; root?: string }[] };
    expect(data.map((m) => m.id)).toEqual(["tiny", "huanhuan", "zhenhuan"]);
    expect(data.slice(1).map((m) => [m.parent, m.root])).toEqual([["tiny", adapters.huanhuan], ["tiny", adapters.zhenhuan]]);
  });

  it("answers each adapter's name as the notebook's chat with that adapter does, and the base name as the model", async () => {
    const asked = await Promise.all(["huanhuan", "zhenhuan", "tiny"].map(chat));
    const notebook = [];
    for (const view of [model.withAdapter(adapters.huanhuan!), model.withAdapter(adapters.zhenhuan!), model]) {
      notebook.push((await view.chat(QUESTION).greedy().maxTokens(16).quiet()).text);
    }
    expect(asked.map((r) => r.status)).toEqual([200, 200, 200]);
    expect(asked.map((r) => r.model)).toEqual(["huanhuan", "zhenhuan", "tiny"]);
    expect(asked.map((r) => r.content)).toEqual(notebook);
    expect(new Set(notebook).size).toBe(3); // each adapter changes the reply
  });

  it("answers an unknown model with a 404 that lists the served ids", async () => {
    const res = await fetch(`${server.url}/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "gamma", messages: [{ role: "user", content: "hi" }] }),
    });
    expect(res.status).toBe(404);
    const { error } = (await res.json()) as { error: { message: string; code: string } };
    expect(error.code).toBe("model_not_found");
    expect(error.message).toContain("This server serves `tiny`, `huanhuan`, `zhenhuan`");
  });
});
