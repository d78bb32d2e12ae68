import type { WorkerClient } from "../bridge/client";

const clients = new Set<WorkerClient>();
let listening = false;

/** True inside the Qwen kernel, whose launcher sets QWENBOOK_KERNEL=1. */
export function inKernel(env: Readonly<Record<string, string | undefined>> = process.env): boolean {
  return env.QWENBOOK_KERNEL === "1";
}

/**
 * In the kernel, the interrupt button sends SIGINT; tslab only rejects the cell's promise, so
 * the work the cell started would go on in the worker. This cancels every in-flight request of
 * the registered clients; their replies still arrive, holding the partial result.
 *
 * Outside the kernel nothing is installed: a listener would stop Ctrl-C from ending a script.
 */
export function cancelOnInterrupt(client: WorkerClient): void {
  if (!inKernel()) return;
  clients.add(client);
  if (listening) return;
  listening = true;
  process.on("SIGINT", cancelInFlight);
}

/** Cancels every in-flight request of the registered clients (what the interrupt button does). */
export function cancelInFlight(): void {
  for (const c of clients) {
    if (c.closed) clients.delete(c);
    else void c.cancelAll();
  }
}

/** How many requests the registered clients are waiting on; the kernel lets them end on an interrupt. */
export function requestsInFlight(): number {
  let n = 0;
  for (const c of clients) if (!c.closed) n += c.inFlight().length;
  return n;
}
