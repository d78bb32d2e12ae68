// How the kernel takes execute requests, replacing two tslab behaviours:
//  - tslab publishes `busy` when any shell message arrives and `idle` when it has been handled, so
//    with several queued cells (Run All) the first `idle` comes while the others still wait or run
//    and JupyterLab shows "Idle" during the run. Here, as in ipykernel, an execute request is
//    `busy` from when it starts executing until its reply is sent, then `idle`.
//  - after an error tslab aborts every request that arrives within the next 200 ms (it resets its
//    queue on a timer). Here the requests queued before the error reply are aborted, and a request
//    sent after it runs, however soon.
// Requests run one at a time in arrival order; other shell messages are answered at once, as before.

/** The parts of tslab's ZmqMessage used here. */
export interface ShellMessage {
  header: { msg_type: string };
  content: Record<string, unknown>;
  createReply(): ShellMessage;
  signAndSend(key: string, socket: unknown): void;
}

export interface ExecuteContent {
  status: string;
  execution_count?: number;
}

type WriteStream = (name: string, text: string) => void;
type WriteDisplayData = (data: unknown, update: boolean) => void;

/** tslab's ZmqServer, as far as this module touches it. */
export interface ZmqServerLike {
  connInfo: { key: string };
  iopub: unknown;
  handler: { handleExecute(req: Record<string, unknown>, writeStream: WriteStream, writeDisplayData: WriteDisplayData): Promise<ExecuteContent> };
  publishStatus(status: string, parent: ShellMessage): void;
  handleExecute(sock: unknown, msg: ShellMessage): Promise<void>;
}

/** tslab's JupyterHandlerImpl, as far as this module touches it. */
export interface JupyterHandlerLike {
  handleExecuteImpl(req: Record<string, unknown>, writeStream: WriteStream, writeDisplayData: WriteDisplayData): Promise<{ count: number }>;
  handleExecute(req: Record<string, unknown>, writeStream: WriteStream, writeDisplayData: WriteDisplayData): Promise<ExecuteContent>;
}

export interface TslabJupyterClasses {
  ZmqServer: { prototype: ZmqServerLike };
  JupyterHandlerImpl: { prototype: JupyterHandlerLike };
}

/**
 * Decides, request by request, whether an execute request runs or is aborted: a failed request
 * (with stop_on_error, the default) aborts those that arrived before its reply went out.
 */
export class ExecuteQueue {
  #tail: Promise<void> = Promise.resolve();
  #generation = 0;

  /**
   * Queues a request as it arrives. `run` is called when its turn comes with `aborted` true if an
   * earlier request failed after this one arrived; it returns whether this request failed.
   */
  add(stopOnError: boolean, run: (aborted: boolean) => Promise<{ failed: boolean }>): Promise<void> {
    const generation = this.#generation;
    const turn = this.#tail.then(async () => {
      const { failed } = await run(generation !== this.#generation);
      if (failed && stopOnError) this.#generation += 1;
    });
    this.#tail = turn.catch(() => undefined);
    return turn;
  }
}

const STATUS_PUBLISHED_BY_QUEUE = "execute_request";

/** Patches tslab's ZmqServer and JupyterHandlerImpl prototypes (see the top of this file). */
export function patchExecuteRequests(jupyter: TslabJupyterClasses): void {
  const server = jupyter.ZmqServer.prototype;
  const publish = server.publishStatus;
  const queue = new ExecuteQueue();
  let executing: ShellMessage | null = null;

  server.publishStatus = function (this: ZmqServerLike, status: string, parent: ShellMessage) {
    // handleShellMessage reports busy/idle around every message as it arrives; execute requests
    // report theirs around their execution instead (below).
    if (parent.header.msg_type === STATUS_PUBLISHED_BY_QUEUE) return;
    publish.call(this, status, parent);
    // A completion or inspection answered while a cell runs must not leave the kernel shown idle.
    if (status === "idle" && executing) publish.call(this, "busy", executing);
  };

  server.handleExecute = function (this: ZmqServerLike, sock: unknown, msg: ShellMessage): Promise<void> {
    const stopOnError = msg.content.stop_on_error !== false;
    return queue.add(stopOnError, async (aborted) => {
      executing = msg;
      publish.call(this, "busy", msg);
      let content: ExecuteContent = { status: "abort" };
      try {
        if (!aborted) content = await this.handler.handleExecute(msg.content, streamWriter(this, msg), displayWriter(this, msg));
        const reply = msg.createReply();
        reply.header.msg_type = "execute_reply";
        reply.content = { ...content };
        reply.signAndSend(this.connInfo.key, sock);
      } finally {
        executing = null;
        publish.call(this, "idle", msg);
      }
      return { failed: content.status === "error" };
    });
  };

  // The server runs one request at a time, so the handler needs neither tslab's queue nor its
  // 200 ms reset; it runs the cell and says how it went.
  jupyter.JupyterHandlerImpl.prototype.handleExecute = async function (
    this: JupyterHandlerLike,
    req: Record<string, unknown>,
    writeStream: WriteStream,
    writeDisplayData: WriteDisplayData,
  ): Promise<ExecuteContent> {
    try {
      const count = await this.handleExecuteImpl(req, writeStream, writeDisplayData);
      return { status: "ok", execution_count: count.count };
    } catch (e) {
      // tslab's handleExecuteImpl throws its ExecutionCount when the cell failed.
      if (isExecutionCount(e)) return { status: "error", execution_count: e.count };
      console.error("unexpected error:", e);
      return { status: "error" };
    }
  };
}

function isExecutionCount(e: unknown): e is { count: number } {
  return typeof e === "object" && e !== null && e.constructor?.name === "ExecutionCount" && typeof (e as { count?: unknown }).count === "number";
}

function streamWriter(server: ZmqServerLike, msg: ShellMessage): WriteStream {
  return (name, text) => {
    const out = msg.createReply();
    out.header.msg_type = "stream";
    out.content = { name, text };
    out.signAndSend(server.connInfo.key, server.iopub);
  };
}

function displayWriter(server: ZmqServerLike, msg: ShellMessage): WriteDisplayData {
  return (data, update) => {
    const out = msg.createReply();
    out.header.msg_type = update ? "update_display_data" : "display_data";
    out.content = data as Record<string, unknown>;
    out.signAndSend(server.connInfo.key, server.iopub);
  };
}
