// Bad input against a real worker: each case is an Error naming its cause (with the Python exception
// where there is one), and none of them hangs, including a worker killed in the middle of a request.
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Qwen, WorkerError, WorkerExitedError, type Model } from "../../kernel/src/index";
import { privateRuntimeDir, recordingSink, tinyModel } from "./helpers";

let qwen: Qwen;
let model: Model;
let sink: ReturnType<typeof recordingSink>;
const scratch = mkdtempSync(join(tmpdir(), "qwenbook-bad-models-"));

beforeAll(async () => {
  privateRuntimeDir("errors");
  sink = recordingSink();
  qwen = new Qwen({ sink });
  model = await qwen.load(tinyModel(), { quiet: true });
});

afterAll(async () => {
  await qwen?.shutdown();
});

async function rejection(p: Promise<unknown>): Promise<Error> {
  const e = await p.then(
    () => null,
    (err: unknown) => err,
  );
  if (!(e instanceof Error)) throw new Error(`expected a rejection with an Error, got ${String(e)}`);
  return e;
}

describe("bad input", () => {
  it("an unknown hub id: the worker's ModelNotFoundError comes back as a WorkerError", async () => {
    const e = await rejection(qwen.load("qwenbook-tests/no-such-model-anywhere", { quiet: true }));
    expect(e).toBeInstanceOf(WorkerError);
    expect((e as WorkerError).ename).toMatch(/NotFound/);
    expect(e.message).toMatch(/^load failed: \w+: .*qwenbook-tests\/no-such-model-anywhere/);
    expect((e as WorkerError).traceback.length).toBeGreaterThan(0);
  });

  it("a missing folder fails before reaching the worker, with the path it tried", async () => {
    const e = await rejection(qwen.load("./models/not-here"));
    expect(e.message).toBe(
      `No model folder at ${join(process.cwd(), "models", "not-here")} (from "./models/not-here"). ` +
        'Pass an existing folder with config.json and weights, or a hub id such as "Qwen/Qwen2.5-7B-Instruct".',
    );
  });

  it("a folder that is not a causal LM", async () => {
    const bert = join(scratch, "bert");
    mkdirSync(bert);
    writeFileSync(join(bert, "config.json"), JSON.stringify({ model_type: "bert", architectures: ["BertForMaskedLM"] }));
    const e1 = await rejection(qwen.load(bert));
    expect(e1).toBeInstanceOf(WorkerError);
    expect(e1.message).toMatch(/NotACausalLMError: .*bert model \(BertForMaskedLM\), not a causal language model/);

    const notes = join(scratch, "notes");
    mkdirSync(notes);
    writeFileSync(join(notes, "README.md"), "hello");
    const e2 = await rejection(qwen.load(notes));
    expect(e2.message).toMatch(/has no config\.json.*README\.md/);
  });

  it("wrong option types and values fail at once, naming the option", async () => {
    await expect(qwen.load(tinyModel(), { dtype: "int3" as "fp32" })).rejects.toThrow(
      new RangeError('load option dtype must be one of "auto", "bf16", "fp16", "fp32", got "int3"'),
    );
    await expect(qwen.load(tinyModel(), { dtpye: "fp32" } as object)).rejects.toThrow(/has no option "dtpye"/);
    await expect(qwen.load(42 as unknown as string)).rejects.toThrow(TypeError);
    expect(() => model.chat("hi").maxTokens(0)).toThrow(new RangeError("maxTokens(n) must be at least 1, got 0"));
    expect(() => model.chat("hi").temperature("hot" as unknown as number)).toThrow(TypeError);
    expect(() => model.chat(undefined as unknown as string)).toThrow(/chat\(prompt\) expects a string, got undefined/);
  });

  it("a device the worker does not have comes back with the worker's explanation", async () => {
    const e = await rejection(qwen.load(tinyModel(), { device: "cuda:7", quiet: true }));
    expect(e).toBeInstanceOf(WorkerError);
    expect(e.message).toMatch(/cuda:7/);
  });

  it("a worker killed mid-request rejects the request with the cause, and the next call recovers", async () => {
    const { pid, log } = await qwen.status();
    const stream = model.chat("Tell me a very long story.").greedy().maxTokens(3000).stream();
    const consume = (async () => {
      for await (const _ of stream) process.kill(pid, "SIGKILL");
    })();
    const e = await rejection(consume);
    expect(e).toBeInstanceOf(WorkerExitedError);
    expect(e.message).toContain(`The qwenbook worker (pid ${pid}) exited while this generate request`);
    expect(e.message).toContain(log);

    // The model object reloads itself into the new worker that the next call starts.
    const reply = await model.chat("hi").greedy().maxTokens(4);
    expect(reply.completionTokens).toBeGreaterThan(0);
    expect((await qwen.status()).pid).not.toBe(pid);
    expect(sink.out.join("")).toContain("the worker was restarted; loading");
  });
});
