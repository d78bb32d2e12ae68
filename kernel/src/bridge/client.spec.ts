import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { WorkerClient } from "./client";
import { WorkerError, WorkerExitedError } from "./errors";
import { helloHandler, startFakeWorker, type FakeWorker } from "./testutil";

let worker: FakeWorker | undefined;
let client: WorkerClient | undefined;
afterEach(() => {
  client?.close();
  worker?.close();
  client = worker = undefined;
});

const okGenerate = (text: string) => ({
  status: "ok", text, finish_reason: "stop", prompt_tokens: 3, completion_tokens: 2, ttft_ms: 1, duration_ms: 2,
});

describe("WorkerClient", () => {
  it("says hello with the protocol version and keeps the worker's answer", async () => {
    worker = await startFakeWorker({ hello: helloHandler() });
    client = await WorkerClient.connect(worker.info, { clientName: "spec" });
    // The pid and host let the worker tell when this process is gone (models it loaded stop counting it).
    expect(worker.received[0].content).toEqual({ protocol_version: "1.0", client: "spec", pid: process.pid, host: hostname() });
    expect(worker.received[0].header.session).toBe(client.session);
    expect(client.hello.devices).toEqual(["cpu"]);
  });

  it("refuses a worker of another major protocol version", async () => {
    worker = await startFakeWorker({ hello: helloHandler("2.0") });
    await expect(WorkerClient.connect(worker.info)).rejects.toThrow(/speaks protocol 2.0 but this kernel speaks 1.0/);
  });

  it("gives up on hello when nothing answers at the endpoint, saying what to check", async () => {
    worker = await startFakeWorker({ hello: () => undefined });
    await expect(WorkerClient.connect(worker.info, { helloTimeoutMs: 300 })).rejects.toThrow(
      /No reply to hello within 0.3 s.*names pid \d+ at tcp:\/\/127\.0\.0\.1:\d+/s,
    );
  });

  it("passes events to onEvent in order and resolves with the reply", async () => {
    worker = await startFakeWorker({
      hello: helloHandler(),
      generate: async (_m, r) => {
        for (const [i, t] of ["a", "b", "c"].entries()) await r.event("token", { text: t, token_ids: [i], index: i });
        await r.reply(okGenerate("abc"));
      },
    });
    client = await WorkerClient.connect(worker.info);
    const seen: string[] = [];
    const reply = await client.request(
      "generate",
      { model_id: "m", messages: [{ role: "user", content: "hi" }] },
      { onEvent: (e) => seen.push(e.content.text) },
    );
    expect(seen).toEqual(["a", "b", "c"]);
    expect(reply.text).toBe("abc");
    expect(client.inFlight()).toEqual([]);
  });

  it("routes concurrent requests' events and replies to the right caller", async () => {
    worker = await startFakeWorker({
      hello: helloHandler(),
      generate: async (m, r) => {
        const text = (m.content as { messages: { content: string }[] }).messages[0].content;
        await new Promise((res) => setTimeout(res, text === "slow" ? 50 : 0));
        await r.event("token", { text, token_ids: [], index: 0 });
        await r.reply(okGenerate(text));
      },
    });
    client = await WorkerClient.connect(worker.info);
    const run = (text: string) => {
      const events: string[] = [];
      return client!
        .request("generate", { model_id: "m", messages: [{ role: "user", content: text }] }, { onEvent: (e) => events.push(e.content.text) })
        .then((reply) => ({ reply: reply.text, events }));
    };
    expect(await Promise.all([run("slow"), run("fast")])).toEqual([
      { reply: "slow", events: ["slow"] },
      { reply: "fast", events: ["fast"] },
    ]);
  });

  it("rejects an error reply with WorkerError carrying the Python exception and traceback", async () => {
    worker = await startFakeWorker({
      hello: helloHandler(),
      load: (_m, r) =>
        r.reply({ status: "error", ename: "OSError", evalue: "no such model", traceback: ["Traceback (most recent call last):", "OSError: no such model"] }),
    });
    client = await WorkerClient.connect(worker.info);
    const err = await client.request("load", { model: "nope/nope" }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(WorkerError);
    expect(err).toMatchObject({ request: "load", ename: "OSError", evalue: "no such model", message: "load failed: OSError: no such model" });
    expect((err as WorkerError).pythonTraceback).toContain("Traceback (most recent call last):");
  });

  it("drops messages with a bad signature and says so", async () => {
    const warnings: string[] = [];
    worker = await startFakeWorker({
      hello: helloHandler(),
      status: async (_m, r) => {
        await r.forged("status_reply", { status: "ok", pid: 666, uptime_s: 0, models: [], running: [], memory: [], devices: ["cpu"] });
        await r.reply({ status: "ok", pid: 1, uptime_s: 0, models: [], running: [], memory: [], devices: ["cpu"] });
      },
    });
    client = await WorkerClient.connect(worker.info, { warn: (l) => warnings.push(l) });
    expect((await client.request("status", {})).pid).toBe(1);
    expect(warnings).toEqual([expect.stringMatching(/dropped a message from the worker: bad signature/)]);
  });

  it("sends cancel with the target msg_id when the signal aborts, and still resolves with the reply", async () => {
    let finish: (() => void) | undefined;
    worker = await startFakeWorker({
      hello: helloHandler(),
      generate: (_m, r) => {
        finish = () => void r.reply({ ...okGenerate("par"), finish_reason: "cancelled" });
      },
      cancel: (m, r) => {
        finish?.();
        return r.reply({ status: "ok", cancelled: (m.content as { target: string }).target.length > 0 });
      },
    });
    client = await WorkerClient.connect(worker.info);
    const abort = new AbortController();
    const pending = client.request("generate", { model_id: "m", messages: [{ role: "user", content: "x" }] }, { signal: abort.signal });
    const target = client.inFlight()[0].msgId;
    abort.abort();
    const reply = await pending;
    expect(reply.finish_reason).toBe("cancelled");
    const cancel = worker.received.find((m) => m.header.msg_type === "cancel");
    expect(cancel?.content).toEqual({ target });
  });

  it("rejects waiting requests, naming them and the log, when the worker's process dies", async () => {
    const stand = spawn(process.execPath, ["-e", "setTimeout(() => {}, 60000)"]);
    worker = await startFakeWorker({ hello: helloHandler(), generate: () => undefined }, stand.pid!);
    client = await WorkerClient.connect(worker.info, { livenessIntervalMs: 50 });
    const pending = client.request("generate", { model_id: "m", messages: [{ role: "user", content: "x" }] });
    stand.kill("SIGKILL");
    const err = await pending.catch((e: unknown) => e);
    expect(err).toBeInstanceOf(WorkerExitedError);
    expect((err as Error).message).toMatch(/worker \(pid \d+\) exited while this generate request \([0-9a-f-]+\) was waiting.*fake-worker\.log/s);
    expect(client.closed).toBe(true);
    await expect(client.request("status", {})).rejects.toThrow(/has exited/);
  });

  it("delivers broadcasts to subscribers until they unsubscribe", async () => {
    worker = await startFakeWorker({ hello: helloHandler() });
    client = await WorkerClient.connect(worker.info);
    const states: string[] = [];
    const stop = client.subscribe("worker_status", (c) => states.push(c.state));
    // PUB drops messages until the subscription has reached it, so publish until one arrives.
    while (states.length === 0) {
      await worker.publish("worker_status", { state: "busy", running: 1 });
      await new Promise((r) => setTimeout(r, 20));
    }
    await worker.publish("gpu", { devices: [], time: 0 });
    stop();
    expect(new Set(states)).toEqual(new Set(["busy"]));
  });

  it("connects over Unix sockets when the runtime file says ipc: requests and broadcasts", async () => {
    const dir = mkdtempSync(join(tmpdir(), "qwenbook-ipc-spec-"));
    try {
      worker = await startFakeWorker({ hello: helloHandler(), generate: async (_m, r) => r.reply(okGenerate("over ipc")) }, process.pid, dir);
      expect(worker.info.transport).toBe("ipc");
      client = await WorkerClient.connect(worker.info);
      const reply = await client.request("generate", { model_id: "m", messages: [{ role: "user", content: "hi" }] });
      expect(reply.text).toBe("over ipc");
      const states: string[] = [];
      client.subscribe("worker_status", (c) => states.push(c.state));
      while (states.length === 0) {
        await worker.publish("worker_status", { state: "idle", running: 0 });
        await new Promise((r) => setTimeout(r, 20));
      }
      expect(states[0]).toBe("idle");
    } finally {
      client?.close();
      worker?.close();
      client = worker = undefined;
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
