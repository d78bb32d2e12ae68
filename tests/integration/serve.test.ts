// m.serve() through a real worker with the tiny model: the official openai client (streaming and
// not) against m.chat, curl, OpenAI-shaped errors, 32 concurrent streams, a notebook chat during
// HTTP traffic, stop/port handling, and the headless `qwenbook serve` CLI.
import { spawn, spawnSync } from "node:child_process";
import { createServer, type Server as NetServer } from "node:net";
import { inspect } from "node:util";
import OpenAI from "openai";
import type { ChatCompletionCreateParamsNonStreaming, ChatCompletionCreateParamsStreaming } from "openai/resources/chat/completions";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Qwen, type Model, type Server } from "../../kernel/src/index";
import { cli, privateRuntimeDir, recordingSink, tinyModel } from "./helpers";

const KEY = "sk-local-test";
const NAME = "qwen-huanhuan";
const SYSTEM = "You are a helpful assistant.";
const TOPICS = ["rivers", "the moon", "秋天的桂花", "prime numbers", "a lost cat", "洛阳的牡丹", "trains", "the sea"];

let sink: ReturnType<typeof recordingSink>;
let qwen: Qwen;
let model: Model;
let server: Server;
let openai: OpenAI;

type Message = { role: "system" | "user"; content: string };

function messages(question: string): Message[] {
  return [
    { role: "system", content: SYSTEM },
    { role: "user", content: question },
  ];
}

/**
 * A greedy request with the sampling the notebook's .greedy() uses. The server fills unset options
 * from the model's generation_config (as vLLM does), so the repetition penalty is pinned to 1 here
 * to compare like with like on models whose config sets one.
 */
function greedyBody(question: string, maxTokens: number): ChatCompletionCreateParamsNonStreaming {
  return { model: NAME, messages: messages(question), max_tokens: maxTokens, temperature: 0, repetition_penalty: 1 } as ChatCompletionCreateParamsNonStreaming;
}

function streamBody(question: string, maxTokens: number): ChatCompletionCreateParamsStreaming {
  return { ...greedyBody(question, maxTokens), stream: true, stream_options: { include_usage: true } } as ChatCompletionCreateParamsStreaming;
}

async function notebookChat(question: string, maxTokens: number) {
  return model.chat(question).system(SYSTEM).greedy().maxTokens(maxTokens).quiet();
}

async function streamText(question: string, maxTokens: number): Promise<{ text: string; finish: string | null; tokens: number | undefined }> {
  const stream = await openai.chat.completions.create(streamBody(question, maxTokens));
  let text = "";
  let finish: string | null = null;
  let tokens: number | undefined;
  for await (const chunk of stream) {
    const choice = chunk.choices[0];
    text += choice?.delta.content ?? "";
    finish = choice?.finish_reason ?? finish;
    tokens = chunk.usage?.completion_tokens ?? tokens;
  }
  return { text, finish, tokens };
}

async function raw(path: string, init: RequestInit = {}): Promise<{ status: number; body: { error?: Record<string, unknown> } & Record<string, unknown> }> {
  const res = await fetch(server.url + path, init);
  return { status: res.status, body: (await res.json()) as { error?: Record<string, unknown> } };
}

function expectOpenAIError(body: { error?: Record<string, unknown> }): Record<string, unknown> {
  expect(Object.keys(body)).toEqual(["error"]);
  expect(Object.keys(body.error!).sort()).toEqual(["code", "message", "param", "type"]);
  expect(body.error!.message).toEqual(expect.any(String));
  return body.error!;
}

function listen(port: number): Promise<NetServer> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(port, "127.0.0.1", () => resolve(s));
  });
}

function close(s: NetServer): Promise<void> {
  return new Promise((resolve) => s.close(() => resolve()));
}

beforeAll(async () => {
  privateRuntimeDir("serve");
  sink = recordingSink();
  qwen = new Qwen({ sink });
  model = await qwen.load(tinyModel(), { dtype: "fp32", device: "cpu", quiet: true });
  server = await model.serve({ port: 0, apiKey: KEY, name: NAME });
  openai = new OpenAI({ baseURL: server.url, apiKey: KEY, maxRetries: 0, timeout: 120_000 });
});

afterAll(async () => {
  await server?.stop();
  await qwen?.shutdown();
});

describe("m.serve() through a real worker", () => {
  it("returns a Server that shows its URL, model name and a curl example", () => {
    expect(server.port).toBeGreaterThan(0);
    expect(server.url).toBe(`http://127.0.0.1:${server.port}/v1`);
    expect(server.modelName).toBe(NAME);
    expect(server.modelId).toBe(model.id);
    const shown = inspect(server);
    expect(shown).toContain(server.url);
    expect(shown).toContain(`"${NAME}"`);
    expect(shown).toContain(`curl ${server.url}/chat/completions`);
    expect(server.curlExample).toContain(`Authorization: Bearer ${KEY}`);
    expect(sink.out.join("")).toContain(`serving ${model.id} as "${NAME}" at ${server.url}`);
  });

  it("checks options before anything is sent", () => {
    expect(() => model.serve({ port: 70000 })).toThrow(/port must be at most 65535/);
    expect(() => model.serve({ apiKey: "has spaces" })).toThrow(/apiKey must not contain spaces/);
    expect(() => model.serve({ prot: 8000 } as never)).toThrow(/no option "prot"; known options: port, host/);
    expect(() => model.serve({ maxBatchSize: 0 })).toThrow(/maxBatchSize must be at least 1/);
  });

  it("lists the served name and gives the openai client the same greedy text as m.chat, streamed or not", async () => {
    expect((await openai.models.list()).data.map((m) => m.id)).toEqual([NAME]);
    const question = "Write a haiku about the sea.";
    const reply = await notebookChat(question, 24);
    const whole = await openai.chat.completions.create(greedyBody(question, 24));
    expect(whole.choices[0].message.content).toBe(reply.text);
    expect(whole.choices[0].finish_reason).toBe(reply.finishReason);
    expect(whole.usage).toMatchObject({ prompt_tokens: reply.promptTokens, completion_tokens: reply.completionTokens });
    const streamed = await streamText(question, 24);
    expect(streamed).toEqual({ text: reply.text, finish: reply.finishReason, tokens: reply.completionTokens });
  });

  it("answers curl without streaming", async () => {
    const question = "你好，你是谁？";
    const reply = await notebookChat(question, 16);
    const body = JSON.stringify(greedyBody(question, 16));
    const r = spawnSync(
      "curl",
      ["-sS", `${server.url}/chat/completions`, "-H", "Content-Type: application/json", "-H", `Authorization: Bearer ${KEY}`, "-d", body],
      { encoding: "utf8", timeout: 60_000 },
    );
    expect(r.status, r.stderr).toBe(0);
    const answer = JSON.parse(r.stdout) as { object: string; choices: { message: { content: string } }[] };
    expect(answer.object).toBe("chat.completion");
    expect(answer.choices[0].message.content).toBe(reply.text);
  });

  it("refuses a wrong API key with 401, bad JSON with 400 and an unknown model with 404, in OpenAI's error shape", async () => {
    const wrong = new OpenAI({ baseURL: server.url, apiKey: "sk-wrong", maxRetries: 0 });
    const denied = await wrong.chat.completions.create(greedyBody("hi", 4)).catch((e: unknown) => e);
    expect(denied).toBeInstanceOf(OpenAI.AuthenticationError);
    expect((denied as InstanceType<typeof OpenAI.AuthenticationError>).status).toBe(401);
    const unauthorized = await raw("/models");
    expect(unauthorized.status).toBe(401);
    expectOpenAIError(unauthorized.body);

    const headers = { "Content-Type": "application/json", Authorization: `Bearer ${KEY}` };
    const bad = await raw("/chat/completions", { method: "POST", headers, body: '{"model": "qwen-huanhuan", "messages": [' });
    expect(bad.status).toBe(400);
    expect(expectOpenAIError(bad.body).type).toBe("invalid_request_error");

    const unknown = await openai.chat.completions.create({ ...greedyBody("hi", 4), model: "gpt-4o" }).catch((e: unknown) => e);
    expect(unknown).toBeInstanceOf(OpenAI.NotFoundError);
    const missing = await raw("/chat/completions", { method: "POST", headers, body: JSON.stringify({ ...greedyBody("hi", 4), model: "gpt-4o" }) });
    expect(missing.status).toBe(404);
    expect(expectOpenAIError(missing.body)).toMatchObject({ code: "model_not_found", param: "model" });

    const stats = await server.stats();
    expect(stats.running).toBe(true);
    expect(stats.errors).toBeGreaterThanOrEqual(4);
    expect(stats.lastError).toMatch(/^404: The model `gpt-4o` does not exist/);
    expect(stats.lastErrorAt).toBeInstanceOf(Date);
    expect(String(server)).toContain("last error  404: The model `gpt-4o`");
  });

  it("finishes 32 concurrent streams, each complete and equal to its m.chat reply", async () => {
    const n = 24;
    const questions = TOPICS.map((t) => `Tell me about ${t}.`);
    const expected: string[] = [];
    for (const q of questions) expected.push((await notebookChat(q, n)).text);
    const before = (await server.stats()).requestsTotal;
    const results = await Promise.all(Array.from({ length: 32 }, (_, i) => streamText(questions[i % questions.length], n)));
    results.forEach((r, i) => expect(r).toEqual({ text: expected[i % questions.length], finish: "length", tokens: n }));
    const after = await server.stats();
    expect(after.requestsTotal - before).toBe(32);
    expect(after.requestsActive).toBe(0);
  });

  it("runs a notebook chat while 8 HTTP streams are generating, without waiting for them to end", async () => {
    const alone = await notebookChat("count to five", 24);
    const controller = new AbortController();
    let open = 0;
    const flowing: Promise<void>[] = [];
    const streams = TOPICS.map((topic) => {
      let markFlowing!: () => void;
      flowing.push(new Promise<void>((resolve) => (markFlowing = resolve)));
      const body = { ...streamBody(`Tell me about ${topic}.`, 2000), ignore_eos: true } as ChatCompletionCreateParamsStreaming;
      return (async () => {
        open += 1;
        try {
          const stream = await openai.chat.completions.create(body, { signal: controller.signal });
          for await (const chunk of stream) if (chunk.choices[0]?.delta.content) markFlowing();
        } catch (error) {
          if (!controller.signal.aborted) throw error;
        } finally {
          open -= 1;
          markFlowing(); // a stream that failed early is reported by Promise.all(streams) below
        }
      })();
    });
    await Promise.all(flowing);
    const during = await notebookChat("count to five", 24);
    const stillStreaming = open;
    controller.abort(); // the clients leave mid-stream; the server stops generating for them
    await Promise.all(streams);
    expect(during.text).toBe(alone.text);
    expect(during.tokenIds).toEqual(alone.tokenIds);
    expect(stillStreaming).toBe(8);
  });

  it("returns the running server for the same options and refuses other options while it runs", async () => {
    const again = await model.serve({ port: server.port, apiKey: KEY, name: NAME });
    expect(again.id).toBe(server.id);
    await expect(model.serve({ port: 0, name: "another-name" })).rejects.toThrow(`${model.id} is already served at ${server.url}`);
  });

  it("stop() frees the port and keeps the model loaded", async () => {
    const stats = await server.stop();
    expect(stats.running).toBe(false);
    expect(server.running).toBe(false);
    expect(String(server)).toContain("stopped");
    const bound = await listen(server.port); // the port is free again
    await close(bound);
    expect((await server.stop()).running).toBe(false); // stopping twice is harmless
    expect((await model.chat("hi").greedy().maxTokens(4).quiet()).completionTokens).toBe(4);
  });

  it("a port in use is an error naming the port", async () => {
    const taken = await listen(0);
    const port = (taken.address() as { port: number }).port;
    try {
      await expect(model.serve({ port })).rejects.toThrow(`port ${port} on 127.0.0.1 is already in use`);
    } finally {
      await close(taken);
    }
  });

  it("passes the overload limits on: a body over maxBody is a 413, a request past maxQueue a 429 with Retry-After", async () => {
    const limited = await model.serve({ port: 0, maxBatchSize: 1, maxQueue: 0, maxBody: 2048, retryAfter: 7, clientTimeout: 10 });
    const post = (body: unknown, signal?: AbortSignal) =>
      fetch(`${limited.url}/chat/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body), signal });
    const stop = new AbortController();
    try {
      const big = await post({ messages: [{ role: "user", content: "x".repeat(4096) }], max_tokens: 4 });
      expect(big.status).toBe(413);
      expect(expectOpenAIError((await big.json()) as { error?: Record<string, unknown> }).message).toContain("at most 2048 bytes");
      // One batch row and no queue: while a long stream holds the row, the next request is turned away.
      const long = await post({ messages: [{ role: "user", content: "go on" }], max_tokens: 2000, ignore_eos: true, stream: true }, stop.signal);
      expect(long.status).toBe(200);
      await long.body!.getReader().read();
      const busy = await post({ messages: [{ role: "user", content: "hi" }], max_tokens: 4 });
      expect(busy.status).toBe(429);
      expect(busy.headers.get("retry-after")).toBe("7");
      expect(expectOpenAIError((await busy.json()) as { error?: Record<string, unknown> }).code).toBe("rate_limit_exceeded");
      expect((await limited.stats()).requestsRejected).toBe(1);
    } finally {
      stop.abort();
      await limited.stop();
    }
  });
});

describe("qwenbook serve (headless CLI)", () => {
  it("serves /v1/models and stops on SIGTERM, freeing the port", async () => {
    const child = spawn(process.execPath, [cli, "serve", tinyModel(), "--port", "0", "--api-key", KEY, "--name", "cli-tiny", "--device", "cpu", "--dtype", "fp32"], {
      env: { ...process.env, OMP_NUM_THREADS: "1" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    let err = "";
    child.stderr.on("data", (d: Buffer) => (err += d));
    const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
    try {
      const url = await new Promise<string>((resolve, reject) => {
        child.stdout.on("data", (d: Buffer) => {
          out += d;
          const m = /Serving cli-tiny at (http:\/\/\S+\/v1)/.exec(out);
          if (m) resolve(m[1]);
        });
        void exited.then((code) => reject(new Error(`qwenbook serve exited (${code}) before serving:\n${out}\n${err}`)));
      });
      const res = await fetch(`${url}/models`, { headers: { Authorization: `Bearer ${KEY}` } });
      expect(((await res.json()) as { data: { id: string }[] }).data.map((m) => m.id)).toEqual(["cli-tiny"]);
      child.kill("SIGTERM");
      expect(await exited).toBe(0);
      const port = Number(new URL(url).port);
      await close(await listen(port));
    } finally {
      if (child.exitCode === null) child.kill("SIGKILL");
    }
  });
});
