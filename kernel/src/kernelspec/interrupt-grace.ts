// On the interrupt button tslab at once rejects the running cell ("Interrupted asynchronously"),
// while the worker requests it was awaiting are being cancelled: `const story = await m.chat(...)`
// is never assigned, though the cancelled reply with the kept text arrives a moment later. The
// kernel gives the cancelled requests a short time to come back, so such a cell ends with its
// value assigned (the reply marked cancelled). The cell still counts as interrupted: its reply is
// an error, so a Run All stops there. Without requests in flight, or on a second press, tslab's
// interrupt happens at once.

/** The parts of tslab's executor this wraps. */
export interface InterruptibleExecutor {
  execute(src: string): Promise<boolean>;
  interrupt(): void;
}

export interface InterruptGraceOptions {
  /** Worker requests still awaited (cancelled ones included, until their reply arrives). */
  requestsInFlight(): number;
  /** Cancels what is still in flight when the grace ends (requests the cell started meanwhile). */
  cancelInFlight(): void;
  /** Longest wait for cancelled requests, in ms. */
  graceMs?: number;
  /** How often to look at the requests in flight, in ms. */
  pollMs?: number;
}

const GRACE_MS = 3000;
const POLL_MS = 50;

/** Wraps executor.execute and executor.interrupt in place (see the top of this file). */
export function addInterruptGrace(executor: InterruptibleExecutor, options: InterruptGraceOptions): void {
  const execute = executor.execute.bind(executor);
  const interrupt = executor.interrupt.bind(executor);
  const graceMs = options.graceMs ?? GRACE_MS;
  const pollMs = options.pollMs ?? POLL_MS;
  let running = false;
  let interrupted = false;
  let waiting: ReturnType<typeof setInterval> | null = null;

  const stopWaiting = (): void => {
    if (waiting !== null) clearInterval(waiting);
    waiting = null;
  };

  executor.execute = async (src: string): Promise<boolean> => {
    running = true;
    interrupted = false;
    try {
      const ok = await execute(src);
      // A cell that finished on its cancelled replies was still interrupted.
      return ok && !interrupted;
    } finally {
      running = false;
      stopWaiting();
    }
  };

  executor.interrupt = (): void => {
    if (!running || waiting !== null || options.requestsInFlight() === 0) {
      stopWaiting();
      interrupted = running;
      interrupt();
      return;
    }
    interrupted = true;
    const deadline = Date.now() + graceMs;
    let quiet = 0;
    waiting = setInterval(() => {
      // Two looks in a row with nothing in flight: the cancelled replies are in and the cell has
      // had its turn to go on with them; if it still runs, it is waiting on something else.
      quiet = options.requestsInFlight() === 0 ? quiet + 1 : 0;
      if (quiet < 2 && Date.now() < deadline) return;
      stopWaiting();
      interrupt();
      options.cancelInFlight();
    }, pollMs);
  };
}
