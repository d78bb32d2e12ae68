import { inspect } from "node:util";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { DISPLAY_SINK_KEY, registerSink, type DisplaySink } from "../display/sink";
import { ChatRequest, type ChatIO, type ChatSettings, type ChatTarget } from "./chat";
import { toGenerateRequest } from "./generate-request";
import type { ModelInfo } from "../bridge/protocol.gen";
import { Model, type ModelHost } from "./model";
import { Reply } from "./reply";

function reply(text: string, finishReason: Reply["finishReason"] = "stop"): Reply {
  return new Reply({
    text, finishReason, promptTokens: 5, completionTokens: text.length, ttftMs: 1, durationMs: 10,
    tokensPerSecond: 100, tokenIds: [], model: "m",
  });
}

/** A target that streams `pieces` (stopping early when aborted) and records what it was asked. */
function fakeTarget(pieces: string[]) {
  const calls: { prompt: string; settings: Readonly<ChatSettings> }[] = [];
  const target: ChatTarget = {
    label: "m",
    async run(prompt: string, settings: Readonly<ChatSettings>, io: ChatIO) {
      calls.push({ prompt, settings });
      let text = "";
      for (const p of pieces) {
        await new Promise((r) => setTimeout(r, 1));
        if (io.signal?.aborted) return reply(text, "cancelled");
        text += p;
        io.onText?.(p);
      }
      return reply(text);
    },
  };
  return { target, calls };
}

let printed: string[] = [];
const previous = (globalThis as Record<symbol, unknown>)[DISPLAY_SINK_KEY];
beforeEach(() => {
  printed = [];
  const sink: DisplaySink = { text: (t) => void printed.push(t), display: () => undefined };
  registerSink(sink);
});
afterEach(() => {
  (globalThis as Record<symbol, unknown>)[DISPLAY_SINK_KEY] = previous;
});

describe("ChatRequest options", () => {
  const chat = new ChatRequest(fakeTarget([]).target, "hi");

  it("reject wrong values at once, naming the option and the value", () => {
    expect(() => chat.maxTokens(0)).toThrow(new RangeError("maxTokens(n) must be at least 1, got 0"));
    expect(() => chat.maxTokens(1.5)).toThrow(new RangeError("maxTokens(n) must be a whole number, got 1.5"));
    expect(() => chat.maxTokens("10" as unknown as number)).toThrow(new TypeError('maxTokens(n) expects a number, got the string "10"'));
    expect(() => chat.maxTokens(NaN)).toThrow(RangeError);
    expect(() => chat.temperature(-0.1)).toThrow(/temperature\(t\) must be at least 0/);
    expect(() => chat.topP(0)).toThrow(/topP\(p\) must be greater than 0/);
    expect(() => chat.topP(1.5)).toThrow(/topP\(p\) must be at most 1/);
    expect(() => chat.topK(-1)).toThrow(RangeError);
    expect(() => chat.minP(-0.1)).toThrow(new RangeError("minP(p) must be at least 0, got -0.1"));
    expect(() => chat.minP(1.5)).toThrow(new RangeError("minP(p) must be at most 1, got 1.5"));
    expect(() => chat.minP("0.1" as unknown as number)).toThrow(TypeError);
    expect(() => chat.greedy("yes" as unknown as boolean)).toThrow(TypeError);
    expect(() => chat.stop("")).toThrow(/stop\(...strings\)\[0\] must not be empty/);
    expect(() => chat.stop("a", 3 as unknown as string)).toThrow(/stop\(...strings\)\[1\] expects a string, got number 3/);
    expect(() => chat.stop(...Array.from({ length: 17 }, (_, i) => `s${i}`))).toThrow(/at most 16/);
    expect(() => chat.seed(-1)).toThrow(RangeError);
    expect(() => chat.system(42 as unknown as string)).toThrow(TypeError);
    expect(() => new ChatRequest(fakeTarget([]).target, undefined as unknown as string)).toThrow(/chat\(prompt\) expects a string/);
  });

  it("send the sampling cuts under the protocol's names", () => {
    const s = chat.topP(0.9).topK(40).minP(0.05).settings;
    const req = toGenerateRequest("m", [{ role: "user", content: "hi" }], s);
    expect(req).toMatchObject({ top_p: 0.9, top_k: 40, min_p: 0.05 });
    expect(toGenerateRequest("m", [{ role: "user", content: "hi" }], {})).not.toHaveProperty("min_p");
    expect(String(chat.minP(0.1))).toBe('chat(m, "hi", minP: 0.1)');
  });

  it("return new builders, leaving the original as it was", () => {
    const a = chat.maxTokens(8);
    const b = a.temperature(0.5).stop("x").stop("y");
    expect(chat.settings).toEqual({});
    expect(a.settings).toEqual({ maxTokens: 8 });
    expect(b.settings).toEqual({ maxTokens: 8, temperature: 0.5, stop: ["x", "y"] });
  });

  it("print readably, in toString() and when inspected", () => {
    const b = chat.system("Be brief.").maxTokens(64).greedy().stop("\n");
    expect(String(b)).toBe('chat(m, "hi", system: "Be brief.", maxTokens: 64, greedy, stop: ["\\n"])');
    expect(inspect(b)).toBe(String(b));
  });
});

describe("awaiting a ChatRequest", () => {
  it("streams the pieces to the display sink and resolves to the reply; the builder runs once", async () => {
    const { target, calls } = fakeTarget(["Hel", "lo", "!"]);
    const req = new ChatRequest(target, "hi").maxTokens(3);
    const r = await req;
    expect(String(r)).toBe("Hello!");
    expect(printed).toEqual(["Hel", "lo", "!", "\n"]);
    expect(await req).toBe(r);
    expect(calls).toEqual([{ prompt: "hi", settings: { maxTokens: 3 } }]);
  });

  it("prints nothing when quiet", async () => {
    expect(String(await new ChatRequest(fakeTarget(["a"]).target, "hi").quiet())).toBe("a");
    expect(printed).toEqual([]);
  });

  it("marks a cancelled reply after its partial text", async () => {
    const target: ChatTarget = { label: "m", run: async (_p, _s, io) => (io.onText?.("par"), reply("par", "cancelled")) };
    const r = await new ChatRequest(target, "hi");
    expect(r.cancelled).toBe(true);
    expect(printed.join("")).toBe("par\n[cancelled after 3 tokens]\n");
  });
});

describe("ChatRequest.stream()", () => {
  it("yields the pieces, which join to the reply; awaiting the builder gives that same reply", async () => {
    const req = new ChatRequest(fakeTarget(["a", "b", "c"]).target, "hi");
    const pieces: string[] = [];
    for await (const p of req.stream()) pieces.push(p);
    const r = await req;
    expect(pieces.join("")).toBe(r.text);
    expect(r.text).toBe("abc");
    expect(printed).toEqual([]);
  });

  it("cancels the generation when the loop is left early", async () => {
    const s = new ChatRequest(fakeTarget(["a", "b", "c", "d"]).target, "hi").stream();
    for await (const p of s) {
      expect(p).toBe("a");
      break;
    }
    const r = await s.reply;
    expect(r.finishReason).toBe("cancelled");
    expect(r.text).toBe("a");
  });

  it("rethrows the generation's error from the loop", async () => {
    const target: ChatTarget = { label: "m", run: async () => Promise.reject(new Error("worker said no")) };
    const consume = async () => {
      for await (const _ of new ChatRequest(target, "hi").stream()) void _;
    };
    await expect(consume()).rejects.toThrow("worker said no");
  });

  it("can be iterated once", async () => {
    const s = new ChatRequest(fakeTarget(["a"]).target, "hi").stream();
    for await (const _ of s) void _;
    expect(() => s[Symbol.asyncIterator]()).toThrow(/iterated once/);
  });
});

describe("empty prompts", () => {
  /** A model whose host records whether anything tried to reach the worker. */
  function offlineModel() {
    const reached: string[] = [];
    const host: ModelHost = {
      connection: async () => (reached.push("connection"), Promise.reject(new Error("no worker in this test"))),
      loadOn: async () => (reached.push("load"), Promise.reject(new Error("no worker in this test"))),
      sink: () => ({ text: () => undefined, display: () => undefined }),
    };
    const info = {
      model_id: "tiny:fp32:cpu", source: "tiny", path: "/m", architecture: "Qwen2ForCausalLM", parameters: 1, dtype: "fp32",
      device: "cpu", context_length: 32, vocab_size: 10, has_chat_template: true,
    } as ModelInfo;
    return { model: new Model(host, info, { model: "/m" }, 1), reached };
  }

  it("m.chat, talk.say and their builders refuse an empty or whitespace-only prompt, naming the fix", () => {
    const { model, reached } = offlineModel();
    expect(() => model.chat("")).toThrow(new RangeError('chat(prompt) got an empty string; pass the text to send, e.g. m.chat("What is LoRA?")'));
    expect(() => model.chat(" \n\t")).toThrow(/chat\(prompt\) got only whitespace \(" \\n\\t"\); pass the text to send/);
    const talk = model.conversation();
    expect(() => talk.say("  ")).toThrow(/^say\(text\) got only whitespace .*talk\.say\("And in French\?"\)/);
    expect(() => new ChatRequest(fakeTarget([]).target, "").stream()).toThrow(RangeError);
    expect(reached).toEqual([]);
  });

  it("generate(messages) refuses an empty list and a blank user message before connecting", async () => {
    const { model, reached } = offlineModel();
    await expect(model.generate([], {})).rejects.toThrow(/generate\(messages\) got an empty list; send at least one message/);
    await expect(model.generate([{ role: "system", content: "Be brief." }, { role: "user", content: " " }], {})).rejects.toThrow(
      /generate\(messages\)\[1\]\.content got only whitespace/,
    );
    await expect(model.generate([{ role: "narrator" as "user", content: "x" }], {})).rejects.toThrow(/generate\(messages\)\[0\]\.role must be one of/);
    expect(reached).toEqual([]);
    // An empty assistant or system turn is allowed, as in the OpenAI API; this one gets as far as connecting.
    await expect(model.generate([{ role: "system", content: "" }, { role: "user", content: "hi" }], {})).rejects.toThrow("no worker in this test");
    expect(reached).toEqual(["connection"]);
  });
});
