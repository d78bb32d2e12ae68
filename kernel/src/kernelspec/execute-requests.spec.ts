import { createHmac } from "node:crypto";
import { createRequire } from "node:module";
import { afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { patchExecuteRequests, type TslabJupyterClasses } from "./execute-requests";

// tslab's own jupyter module, patched as the launcher patches it, driven with signed frames as a
// Jupyter client would send them. Sockets are fakes that record what the kernel sends.
const jupyter = createRequire(require.resolve("tslab/package.json"))("./dist/jupyter.js") as TslabJupyterClasses & {
  ZmqServer: new (handler: unknown, configPath: string) => FakeServer;
  JupyterHandlerImpl: new (executor: unknown, isJs: boolean) => unknown;
};

interface FakeServer {
  connInfo: { key: string };
  iopub: { send(frames: Buffer[]): void };
  handleShellMessage(sock: unknown, ...frames: Buffer[]): Promise<void>;
}

interface Sent {
  type: string;
  parent: string;
  content: Record<string, unknown>;
}

const DELIM = "<IDS|MSG>";

function frames(msgType: string, msgId: string, content: Record<string, unknown>): Buffer[] {
  const header = { msg_id: msgId, msg_type: msgType, session: "s", username: "u", version: "5.3", date: "" };
  const parts = [header, {}, {}, content].map((p) => JSON.stringify(p));
  const hmac = createHmac("sha256", "");
  for (const p of parts) hmac.update(p);
  return [Buffer.from(DELIM), Buffer.from(hmac.digest("hex")), ...parts.map((p) => Buffer.from(p))];
}

function parse(raw: Buffer[]): Sent {
  const i = raw.findIndex((b) => b.toString() === DELIM);
  const header = JSON.parse(raw[i + 2].toString()) as { msg_type: string };
  const parent = JSON.parse(raw[i + 3].toString()) as { msg_id: string };
  return { type: header.msg_type, parent: parent.msg_id, content: JSON.parse(raw[i + 5].toString()) as Record<string, unknown> };
}

/**
 * A stand-in for tslab's executor: code "ok" succeeds, "fail" fails, "hold:<name>" runs until
 * release(name) (and fails if released with false).
 */
function fakeExecutor() {
  const held = new Map<string, (ok: boolean) => void>();
  const started: string[] = [];
  return {
    started,
    release(name: string, ok = true) {
      held.get(name)!(ok);
    },
    executor: {
      execute(code: string): Promise<boolean> {
        started.push(code);
        if (code === "ok") return Promise.resolve(true);
        if (code === "fail") return Promise.resolve(false);
        return new Promise<boolean>((resolve) => held.set(code.slice("hold:".length), resolve));
      },
    },
  };
}

function kernel() {
  const fake = fakeExecutor();
  const server = new jupyter.ZmqServer(new jupyter.JupyterHandlerImpl(fake.executor, false), "unused");
  const iopub: Sent[] = [];
  const shell: Sent[] = [];
  server.connInfo = { key: "" };
  server.iopub = { send: (raw) => void iopub.push(parse(raw)) };
  const sock = { send: (raw: Buffer[]) => void shell.push(parse(raw)) };
  const send = (type: string, id: string, content: Record<string, unknown> = {}) => void server.handleShellMessage(sock, ...frames(type, id, content));
  const execute = (id: string, code: string, more: Record<string, unknown> = {}) => send("execute_request", id, { code, silent: false, ...more });
  const statuses = () => iopub.filter((m) => m.type === "status").map((m) => `${m.content.execution_state} ${m.parent}`);
  const reply = (id: string) => shell.find((m) => m.type === "execute_reply" && m.parent === id);
  return { ...fake, iopub, shell, send, execute, statuses, reply };
}

// tslab's handleExecuteImpl points process.stdout/stderr.write at the cell; put them back.
const stdoutWrite = process.stdout.write;
const stderrWrite = process.stderr.write;
afterEach(() => {
  process.stdout.write = stdoutWrite;
  process.stderr.write = stderrWrite;
});

beforeAll(() => {
  patchExecuteRequests(jupyter);
});

describe("execute requests", () => {
  it("are busy from when each starts executing until its reply, one after another, with three queued", async () => {
    const k = kernel();
    k.execute("a", "hold:a");
    k.execute("b", "hold:b");
    k.execute("c", "ok");
    await vi.waitFor(() => expect(k.started).toEqual(["hold:a"]));
    // Queued requests are not reported busy on arrival, so nothing says idle while they wait.
    expect(k.statuses()).toEqual(["busy a"]);
    k.release("a");
    await vi.waitFor(() => expect(k.started).toEqual(["hold:a", "hold:b"]));
    expect(k.statuses()).toEqual(["busy a", "idle a", "busy b"]);
    k.release("b");
    await vi.waitFor(() => expect(k.reply("c")).toBeDefined());
    await vi.waitFor(() => expect(k.statuses()).toEqual(["busy a", "idle a", "busy b", "idle b", "busy c", "idle c"]));
    expect(["a", "b", "c"].map((id) => k.reply(id)?.content)).toEqual([
      { status: "ok", execution_count: 1 },
      { status: "ok", execution_count: 2 },
      { status: "ok", execution_count: 3 },
    ]);
  });

  it("abort only the requests queued before an error reply; one sent right after it runs", async () => {
    const k = kernel();
    k.execute("a", "hold:a");
    k.execute("b", "ok");
    await vi.waitFor(() => expect(k.started).toEqual(["hold:a"]));
    k.release("a", false);
    await vi.waitFor(() => expect(k.reply("b")).toBeDefined());
    expect(k.reply("a")?.content).toEqual({ status: "error", execution_count: 1 });
    expect(k.reply("b")?.content).toEqual({ status: "abort" });
    // At once, well within the 200 ms after the error in which tslab aborted everything.
    k.execute("c", "ok");
    await vi.waitFor(() => expect(k.reply("c")).toBeDefined());
    expect(k.reply("c")?.content).toEqual({ status: "ok", execution_count: 2 });
    expect(k.started).toEqual(["hold:a", "ok"]);
    // The aborted request still gets its busy/idle pair, which clients wait for.
    expect(k.statuses()).toEqual(["busy a", "idle a", "busy b", "idle b", "busy c", "idle c"]);
  });

  it("do not abort the queue after a failed request sent with stop_on_error false", async () => {
    const k = kernel();
    k.execute("a", "hold:a", { stop_on_error: false });
    k.execute("b", "ok");
    await vi.waitFor(() => expect(k.started).toEqual(["hold:a"]));
    k.release("a", false);
    await vi.waitFor(() => expect(k.reply("b")).toBeDefined());
    expect(k.reply("a")?.content).toMatchObject({ status: "error" });
    expect(k.reply("b")?.content).toMatchObject({ status: "ok" });
  });

  it("keep the kernel shown busy when another shell request is answered while a cell runs", async () => {
    const k = kernel();
    k.execute("a", "hold:a");
    await vi.waitFor(() => expect(k.started).toEqual(["hold:a"]));
    k.send("kernel_info_request", "info");
    await vi.waitFor(() => expect(k.shell.some((m) => m.type === "kernel_info_reply")).toBe(true));
    await vi.waitFor(() => expect(k.statuses()).toEqual(["busy a", "busy info", "idle info", "busy a"]));
    k.release("a");
    await vi.waitFor(() => expect(k.statuses().at(-1)).toBe("idle a"));
    // With no cell running, other requests report busy/idle as before.
    k.send("kernel_info_request", "info2");
    await vi.waitFor(() => expect(k.statuses().slice(-2)).toEqual(["busy info2", "idle info2"]));
  });
});
