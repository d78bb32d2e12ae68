// A stand-in worker for unit tests: a real ROUTER socket speaking the real framing, with handlers
// written in the test, so the client's logic is tested without Python.
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { Publisher, Router } from "zeromq";
import type { Header } from "./protocol.gen";
import type { IpcRuntimeInfo, RuntimeInfo, TcpRuntimeInfo } from "./runtime";
import { createSigner, decodeMessage, encodeMessage, makeHeader, type Message } from "./wire";

/** Lets a handler stream events and then reply (or reply with an error). */
export interface Responder {
  event(type: string, content: unknown): Promise<void>;
  reply(content: unknown): Promise<void>;
  /** Sends frames with a wrong signature, to check they are dropped. */
  forged(type: string, content: unknown): Promise<void>;
}

export type Handler = (msg: Message, respond: Responder) => void | Promise<void>;

export interface FakeWorker {
  info: RuntimeInfo;
  /** Every request received, in order. */
  received: Message[];
  publish(topic: string, content: unknown): Promise<void>;
  close(): void;
}

/** `ipcDir`: listen on Unix sockets in that folder, as the real worker does by default, instead of TCP. */
export async function startFakeWorker(handlers: Record<string, Handler>, pid: number = process.pid, ipcDir?: string): Promise<FakeWorker> {
  const key = randomBytes(32).toString("hex");
  const signer = createSigner(key);
  const router = new Router({ linger: 0 });
  await router.bind(ipcDir === undefined ? "tcp://127.0.0.1:*" : `ipc://${join(ipcDir, "fake-router")}`);
  const pub = new Publisher({ linger: 0 });
  await pub.bind(ipcDir === undefined ? "tcp://127.0.0.1:*" : `ipc://${join(ipcDir, "fake-pub")}`);
  const port = (ep: string | null): number => Number(ep?.split(":").pop());
  const where: Pick<TcpRuntimeInfo, "transport" | "ip" | "router_port" | "pub_port"> | Pick<IpcRuntimeInfo, "transport" | "router_endpoint" | "pub_endpoint"> =
    ipcDir === undefined
      ? { transport: "tcp", ip: "127.0.0.1", router_port: port(router.lastEndpoint), pub_port: port(pub.lastEndpoint) }
      : { transport: "ipc", router_endpoint: router.lastEndpoint!, pub_endpoint: pub.lastEndpoint! };
  const info: RuntimeInfo = {
    ...where,
    key,
    signature_scheme: "hmac-sha256",
    pid,
    protocol_version: "1.0",
    worker_version: "test",
    started: new Date().toISOString(),
    python: "none",
    log: join("/nonexistent", "fake-worker.log"),
  };
  const received: Message[] = [];
  let sending = Promise.resolve();
  const send = (frames: Buffer[]): Promise<void> => (sending = sending.then(() => router.send(frames)));

  void (async () => {
    try {
      for await (const frames of router) {
        const identity = frames[0];
        const msg = decodeMessage(signer, frames.slice(1));
        received.push(msg);
        const parent = msg.header;
        const out = (type: string, content: unknown, s = signer): Promise<void> =>
          send([identity, ...encodeMessage(s, { header: makeHeader(type, "fake"), parentHeader: parent as Header, metadata: {}, content })]);
        const handler = handlers[msg.header.msg_type];
        const respond: Responder = {
          event: (type, content) => out(type, content),
          reply: (content) => out(`${msg.header.msg_type}_reply`, content),
          forged: (type, content) => out(type, content, createSigner("0".repeat(64))),
        };
        if (handler) void handler(msg, respond);
        else void respond.reply({ status: "error", ename: "UnknownRequest", evalue: `no handler for ${msg.header.msg_type}`, traceback: [] });
      }
    } catch {
      // Closed by the test.
    }
  })();

  return {
    info,
    received,
    publish: (topic, content) =>
      pub.send([Buffer.from(topic), ...encodeMessage(signer, { header: makeHeader(topic, "fake"), parentHeader: {}, metadata: {}, content })]),
    close() {
      router.close();
      pub.close();
    },
  };
}

/** A hello handler answering like a real worker of `version`. */
export function helloHandler(version = "1.0"): Handler {
  return (_msg, r) =>
    r.reply({ status: "ok", protocol_version: version, worker_version: "test", pid: process.pid, python: "none", torch: "-", transformers: "-", devices: ["cpu"] });
}
