import { randomUUID } from "node:crypto";
import { hostname } from "node:os";
import { Dealer, Subscriber } from "zeromq";
import { WorkerError, WorkerExitedError } from "./errors";
import {
  PROTOCOL_VERSION,
  type BroadcastMap,
  type BroadcastType,
  type EventMap,
  type HelloReply,
  type RequestMap,
  type RequestType,
} from "./protocol.gen";
import { endpoint, isPidAlive, tailOfFile, type RuntimeInfo } from "./runtime";
import { createSigner, decodeMessage, encodeMessage, makeHeader, type Signer } from "./wire";

/** An event streamed for a request of type T, tagged with its msg_type. */
export type EventOf<T extends RequestType> = {
  [E in RequestMap[T]["events"]]: { type: E; content: EventMap[E] };
}[RequestMap[T]["events"]];

export interface RequestOptions<T extends RequestType> {
  /** Called for each event the worker streams for this request, before the reply. */
  onEvent?: (event: EventOf<T>) => void;
  /**
   * Aborting sends `cancel` for this request. The promise still settles with the worker's reply,
   * which for a generation holds the partial text.
   */
  signal?: AbortSignal;
  /** Give up waiting for the reply after this many milliseconds. */
  timeoutMs?: number;
}

export interface ClientOptions {
  /**
   * Names this client in the worker's status and as a user of the models it loads; defaults to a
   * fresh uuid. Reconnecting with the same session keeps those models counted as this client's.
   */
  session?: string;
  /** Sent in hello, shown in the worker's log. */
  clientName?: string;
  /** How long hello may take before the runtime file is considered wrong. */
  helloTimeoutMs?: number;
  /** How often the worker's pid is checked while requests wait. */
  livenessIntervalMs?: number;
  /** Where to report messages the client drops (bad signature, handler errors). */
  warn?: (line: string) => void;
  /** Sees every signed message this client receives, before it is routed (for tracing and tests). */
  onMessage?: (message: ReceivedMessage) => void;
}

/** What `onMessage` is told about a received message. */
export interface ReceivedMessage {
  type: string;
  /** msg_id and session of the request it answers; undefined for none. */
  parentMsgId?: string;
  parentSession?: string;
}

/** A request sent and not yet answered. */
export interface InFlight {
  msgId: string;
  type: RequestType;
  started: Date;
}

interface Pending extends InFlight {
  onEvent?: (event: { type: string; content: unknown }) => void;
  resolve: (reply: unknown) => void;
  reject: (error: Error) => void;
  cleanup: () => void;
}

/** Requests that do work on the worker and so can be stopped by `cancel`. */
const CANCELLABLE: ReadonlySet<RequestType> = new Set<RequestType>(["load", "generate", "save", "export", "train", "run_watch"]);

/**
 * One connection to a worker: a DEALER for requests, their events and replies, and a SUB socket
 * for broadcasts (opened only while something listens).
 *
 * Sockets are read only while something waits on them, with a short receive timeout that doubles
 * as the tick for checking the worker's pid. An idle client therefore holds no pending I/O, and a
 * plain Node script exits after its last await without having to disconnect.
 */
export class WorkerClient {
  readonly info: RuntimeInfo;
  readonly session: string;
  private readonly signer: Signer;
  private readonly dealer: Dealer;
  private subscriber: Subscriber | null = null;
  private readonly listeners = new Map<string, Set<(content: unknown) => void>>();
  private readonly pending = new Map<string, Pending>();
  private readonly options: Required<Omit<ClientOptions, "session" | "onMessage">>;
  private readonly onMessage?: (message: ReceivedMessage) => void;
  private sendChain: Promise<void> = Promise.resolve();
  private pumping = false;
  private subPumping = false;
  private closedReason: string | null = null;
  private hello_: HelloReply | null = null;

  private constructor(info: RuntimeInfo, options: ClientOptions) {
    this.info = info;
    this.session = options.session ?? randomUUID();
    this.options = {
      clientName: options.clientName ?? "qwenbook",
      helloTimeoutMs: options.helloTimeoutMs ?? 20_000,
      livenessIntervalMs: options.livenessIntervalMs ?? 250,
      warn: options.warn ?? ((line) => process.stderr.write(`qwenbook: ${line}\n`)),
    };
    this.onMessage = options.onMessage;
    this.signer = createSigner(info.key);
    this.dealer = new Dealer({ linger: 0, receiveTimeout: this.options.livenessIntervalMs });
    this.dealer.connect(endpoint(info, "router"));
  }

  /** Connects and says hello; refuses a worker whose protocol major version differs. */
  static async connect(info: RuntimeInfo, options: ClientOptions = {}): Promise<WorkerClient> {
    const client = new WorkerClient(info, options);
    try {
      const hello = await client.request(
        "hello",
        // pid and host let the worker tell when this process is gone, so the models it loaded stop counting it as a user.
        { protocol_version: PROTOCOL_VERSION, client: client.options.clientName, pid: process.pid, host: hostname() },
        { timeoutMs: client.options.helloTimeoutMs },
      );
      if (major(hello.protocol_version) !== major(PROTOCOL_VERSION)) {
        throw new Error(
          `The worker (pid ${info.pid}) speaks protocol ${hello.protocol_version} but this kernel speaks ${PROTOCOL_VERSION}. ` +
            "Stop it (npx qwenbook worker stop) so a matching one is started.",
        );
      }
      client.hello_ = hello;
      return client;
    } catch (e) {
      client.close();
      if (e instanceof Error && e.message.startsWith("No reply to hello")) {
        throw new Error(
          `${e.message}. The runtime file names pid ${info.pid} at ${endpoint(info, "router")}, but nothing answered there; ` +
            `if that process is not a qwenbook worker, stop it or delete the runtime file. Worker log: ${info.log}`,
        );
      }
      throw e;
    }
  }

  /** The worker's answer to hello (versions, devices). */
  get hello(): HelloReply {
    if (!this.hello_) throw new Error("hello has not completed");
    return this.hello_;
  }

  get closed(): boolean {
    return this.closedReason !== null;
  }

  /** Requests sent by this client that have no reply yet. */
  inFlight(): InFlight[] {
    return [...this.pending.values()].map(({ msgId, type, started }) => ({ msgId, type, started }));
  }

  /** Sends one request and resolves with its ok reply; an error reply rejects with WorkerError. */
  request<T extends RequestType>(
    type: T,
    content: RequestMap[T]["request"],
    options: RequestOptions<T> = {},
  ): Promise<RequestMap[T]["reply"]> {
    if (this.closedReason !== null) return Promise.reject(new Error(`Cannot send ${type}: ${this.closedReason}`));
    const header = makeHeader(type, this.session);
    const msgId = header.msg_id;
    return new Promise<RequestMap[T]["reply"]>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const onAbort = (): void => void this.cancel(msgId);
      const pending: Pending = {
        msgId,
        type,
        started: new Date(),
        onEvent: options.onEvent as Pending["onEvent"],
        resolve: resolve as (reply: unknown) => void,
        reject,
        cleanup: () => {
          if (timer) clearTimeout(timer);
          options.signal?.removeEventListener("abort", onAbort);
        },
      };
      this.pending.set(msgId, pending);
      if (options.timeoutMs !== undefined) {
        timer = setTimeout(
          () => this.settle(msgId, new Error(`No reply to ${type} within ${(options.timeoutMs! / 1000).toFixed(1)} s`)),
          options.timeoutMs,
        );
      }
      const frames = encodeMessage(this.signer, { header, parentHeader: {}, metadata: {}, content });
      this.send(frames).then(
        () => {
          if (!options.signal) return;
          if (options.signal.aborted) onAbort();
          else options.signal.addEventListener("abort", onAbort, { once: true });
        },
        (e: Error) => this.settle(msgId, new Error(`Could not send ${type} to the worker: ${e.message}`)),
      );
      void this.pump();
    });
  }

  /** Asks the worker to stop request `msgId`; resolves false if it had already finished. */
  async cancel(msgId: string): Promise<boolean> {
    if (!this.pending.has(msgId) || this.closedReason !== null) return false;
    try {
      return (await this.request("cancel", { target: msgId })).cancelled;
    } catch {
      // The request may have just ended, or the worker died; either way its own promise reports it.
      return false;
    }
  }

  /** Cancels every cancellable request of this client (what the kernel's interrupt button does). */
  cancelAll(): Promise<boolean[]> {
    return Promise.all(this.inFlight().filter((r) => CANCELLABLE.has(r.type)).map((r) => this.cancel(r.msgId)));
  }

  /** Calls `handler` for each broadcast of `topic` until the returned function is called. */
  subscribe<B extends BroadcastType>(topic: B, handler: (content: BroadcastMap[B]) => void): () => void {
    if (this.closedReason !== null) throw new Error(`Cannot subscribe: ${this.closedReason}`);
    if (!this.subscriber) {
      this.subscriber = new Subscriber({ linger: 0, receiveTimeout: this.options.livenessIntervalMs });
      this.subscriber.connect(endpoint(this.info, "pub"));
    }
    let set = this.listeners.get(topic);
    if (!set) {
      set = new Set();
      this.listeners.set(topic, set);
      this.subscriber.subscribe(topic);
    }
    const h = handler as (content: unknown) => void;
    set.add(h);
    void this.pumpSubscriber();
    return () => {
      const s = this.listeners.get(topic);
      if (!s?.delete(h) || s.size > 0) return;
      this.listeners.delete(topic);
      this.subscriber?.unsubscribe(topic);
      if (this.listeners.size === 0) this.closeSubscriber();
    };
  }

  /** Closes the sockets; requests still waiting reject with `reason`. */
  close(reason = "the connection to the worker was closed"): void {
    if (this.closedReason !== null) return;
    this.closedReason = reason;
    for (const p of [...this.pending.values()]) this.settle(p.msgId, new Error(`${p.type} did not finish: ${reason}`));
    this.closeSubscriber();
    this.dealer.close();
  }

  private closeSubscriber(): void {
    this.listeners.clear();
    const sub = this.subscriber;
    this.subscriber = null;
    sub?.close();
  }

  private send(frames: Buffer[]): Promise<void> {
    // zeromq allows one send in progress per socket, so sends queue behind each other.
    const next = this.sendChain.then(() => this.dealer.send(frames));
    this.sendChain = next.catch(() => undefined);
    return next;
  }

  private settle(msgId: string, outcome: Error | { reply: unknown }): void {
    const p = this.pending.get(msgId);
    if (!p) return;
    this.pending.delete(msgId);
    p.cleanup();
    if (outcome instanceof Error) p.reject(outcome);
    else p.resolve(outcome.reply);
  }

  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (this.pending.size > 0 && this.closedReason === null) {
        let frames: Buffer[];
        try {
          frames = await this.dealer.receive();
        } catch (e) {
          if (this.closedReason !== null) break;
          if ((e as { code?: string }).code !== "EAGAIN") throw e;
          this.checkWorkerAlive();
          continue;
        }
        this.dispatch(frames);
      }
    } catch (e) {
      this.close(`receiving from the worker failed: ${(e as Error).message}`);
    } finally {
      this.pumping = false;
    }
    // A request may have been added after the loop's last check and before `pumping` was cleared.
    if (this.pending.size > 0 && this.closedReason === null) void this.pump();
  }

  private dispatch(frames: Buffer[]): void {
    let msg;
    try {
      msg = decodeMessage(this.signer, frames);
    } catch (e) {
      this.options.warn(`dropped a message from the worker: ${(e as Error).message}`);
      return;
    }
    const parentId = "msg_id" in msg.parentHeader ? msg.parentHeader.msg_id : undefined;
    const parentSession = "session" in msg.parentHeader ? msg.parentHeader.session : undefined;
    this.onMessage?.({ type: msg.header.msg_type, parentMsgId: parentId, parentSession });
    if (parentSession !== undefined && parentSession !== this.session) {
      // The worker routes by connection; a message for another session here would be another client's data.
      this.options.warn(`dropped a ${msg.header.msg_type} meant for session ${parentSession}, not this client's`);
      return;
    }
    const p = parentId === undefined ? undefined : this.pending.get(parentId);
    // No waiter: the reply to a request this client already gave up on (timeout, close).
    if (!p) return;
    if (msg.header.msg_type === `${p.type}_reply`) {
      const content = msg.content as { status?: unknown; ename?: unknown; evalue?: unknown; traceback?: unknown };
      if (content.status === "error") {
        const tb = Array.isArray(content.traceback) ? content.traceback.map(String) : [];
        this.settle(p.msgId, new WorkerError(p.type, String(content.ename), String(content.evalue), tb));
      } else {
        this.settle(p.msgId, { reply: content });
      }
      return;
    }
    try {
      p.onEvent?.({ type: msg.header.msg_type, content: msg.content });
    } catch (e) {
      this.options.warn(`an event handler for ${p.type} threw: ${(e as Error).stack ?? String(e)}`);
    }
  }

  private checkWorkerAlive(): void {
    if (isPidAlive(this.info.pid)) return;
    const tail = tailOfFile(this.info.log);
    const logPart = tail ? ` Its log (${this.info.log}) ends with:\n${tail}` : ` Its log: ${this.info.log}`;
    for (const p of [...this.pending.values()]) {
      const message =
        `The qwenbook worker (pid ${this.info.pid}) exited while this ${p.type} request (${p.msgId}) was waiting for it.` + logPart;
      this.settle(p.msgId, new WorkerExitedError(message, this.info.pid, this.info.log));
    }
    this.close(`the worker (pid ${this.info.pid}) has exited`);
  }

  private async pumpSubscriber(): Promise<void> {
    if (this.subPumping) return;
    this.subPumping = true;
    try {
      while (this.subscriber && this.listeners.size > 0) {
        const sub = this.subscriber;
        let frames: Buffer[];
        try {
          frames = await sub.receive();
        } catch (e) {
          if (sub.closed || (e as { code?: string }).code === "EAGAIN") continue;
          throw e;
        }
        this.dispatchBroadcast(frames);
      }
    } catch (e) {
      this.options.warn(`broadcasts stopped: ${(e as Error).message}`);
      this.closeSubscriber();
    } finally {
      this.subPumping = false;
    }
  }

  private dispatchBroadcast(frames: Buffer[]): void {
    let msg;
    try {
      msg = decodeMessage(this.signer, frames);
    } catch (e) {
      this.options.warn(`dropped a broadcast from the worker: ${(e as Error).message}`);
      return;
    }
    for (const h of this.listeners.get(msg.header.msg_type) ?? []) {
      try {
        h(msg.content);
      } catch (e) {
        this.options.warn(`a ${msg.header.msg_type} listener threw: ${(e as Error).stack ?? String(e)}`);
      }
    }
  }
}

function major(version: string): string {
  return version.split(".")[0] ?? version;
}
