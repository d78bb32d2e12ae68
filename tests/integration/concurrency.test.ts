// Two notebooks on one worker: one trains while the other chats on another model. Both progress,
// each client receives only messages that answer its own requests, and a cancel in one leaves the
// other's work running.
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Qwen, type Model } from "../../kernel/src/index";
import type { ReceivedMessage } from "../../kernel/src/bridge/client";
import type { DisplaySink } from "../../kernel/src/display/sink";
import { privateRuntimeDir, tinyModel } from "./helpers";

const ROWS = Array.from({ length: 16 }, (_, i) => ({ instruction: `问题${i}`, output: `回答${i}号` }));

/** A terminal-like sink that counts progress lines and can wait for the next one. */
function progressSink(): DisplaySink & { steps: () => number; nextStep: () => Promise<void> } {
  let steps = 0;
  let waiters: Array<() => void> = [];
  return {
    rich: false,
    text(chunk) {
      const n = (chunk.match(/\[train\] step +\d+\//g) ?? []).length;
      if (n === 0) return;
      steps += n;
      const ready = waiters;
      waiters = [];
      ready.forEach((w) => w());
    },
    display: () => undefined,
    steps: () => steps,
    nextStep: () => new Promise<void>((resolve) => waiters.push(resolve)),
  };
}

const tmp = mkdtempSync(join(tmpdir(), "qwenbook-concurrency-"));
const seenA: ReceivedMessage[] = [];
const seenB: ReceivedMessage[] = [];
let sinkA: ReturnType<typeof progressSink>;
let trainer: Qwen;
let chatter: Qwen;
let trained: Model;
let chatted: Model;

beforeAll(async () => {
  privateRuntimeDir("concurrency");
  sinkA = progressSink();
  trainer = new Qwen({ sink: sinkA, onMessage: (m) => seenA.push(m) });
  chatter = new Qwen({ sink: progressSink(), onMessage: (m) => seenB.push(m) });
  trained = await trainer.load(tinyModel(), { dtype: "fp32", device: "cpu", quiet: true });
  chatted = await chatter.load(tinyModel(), { dtype: "bf16", device: "cpu", quiet: true });
});

afterAll(async () => {
  chatter?.disconnect();
  await trainer?.shutdown();
});

describe("two clients on one worker", () => {
  it("train in one and chat in the other: both progress, events stay with their client, cancels stay local", async () => {
    const statusA = await trainer.status();
    expect((await chatter.status()).pid).toBe(statusA.pid);
    expect(chatted.id).not.toBe(trained.id);

    const abortTrain = new AbortController();
    const firstStep = sinkA.nextStep();
    const run = trained.lora({ r: 4 }).dataset(ROWS).maxLength(32).batchSize(2).maxSteps(100_000).logEvery(1).output(join(tmp, "run"));
    const training = run.train({ signal: abortTrain.signal });
    await firstStep;

    // A chat on the other model answers in full while the run goes on.
    const full = await chatted.chat("你好").greedy().maxTokens(8).quiet();
    expect(full.completionTokens).toBe(8);

    // Cancelling the other client's generation stops it and not the run.
    const stream = chatted.chat("讲一个很长的故事").greedy().maxTokens(2000).stream();
    let pieces = 0;
    for await (const _ of stream) if (++pieces === 3) break;
    const cut = await stream.reply;
    expect(cut.finishReason).toBe("cancelled");
    const stepsAfterCancel = sinkA.steps();
    await sinkA.nextStep();
    await sinkA.nextStep();
    expect(sinkA.steps()).toBeGreaterThan(stepsAfterCancel);
    const running = (await chatter.status()).running;
    expect(running.map((r) => r.type)).toEqual(["train"]);

    // Cancelling the run leaves the chatting client's next generation untouched.
    const chatDuringCancel = chatted.chat("你好").greedy().maxTokens(8).quiet();
    abortTrain.abort();
    const result = await training;
    expect(result.status).toBe("cancelled");
    const after = await chatDuringCancel;
    expect(after.finishReason).not.toBe("cancelled");
    expect(after.tokenIds).toEqual(full.tokenIds);

    // Each client received messages only in answer to its own requests (its own session).
    const sessions = (seen: ReceivedMessage[]) => new Set(seen.map((m) => m.parentSession));
    expect(sessions(seenA).size).toBe(1);
    expect(sessions(seenB).size).toBe(1);
    expect([...sessions(seenA)][0]).not.toBe([...sessions(seenB)][0]);
    expect(seenA.filter((m) => m.type === "train_progress").length).toBeGreaterThan(2);
    expect(seenB.filter((m) => m.type.startsWith("train")).map((m) => m.type)).toEqual([]);
    expect(seenA.filter((m) => m.type === "token")).toEqual([]);
    const idsA = new Set(seenA.map((m) => m.parentMsgId));
    expect(seenB.filter((m) => idsA.has(m.parentMsgId))).toEqual([]);
  });
});
