import { WorkerClient } from "./client";
import { isPidAlive, removeStaleRuntimeFile, type RuntimeInfo } from "./runtime";

/**
 * Asks the worker to shut down and waits for its process to end; a worker that does not answer
 * or does not exit gets SIGTERM, then SIGKILL, so `stop` always leaves no worker behind.
 */
export async function stopWorker(info: RuntimeInfo, runtimeFile: string, client?: WorkerClient): Promise<void> {
  let own: WorkerClient | undefined;
  try {
    const c = client && !client.closed ? client : (own = await WorkerClient.connect(info, { clientName: "qwenbook stop" }));
    await c.request("shutdown", {}, { timeoutMs: 10_000 });
  } catch {
    // Unreachable or already exiting: the signals below still make sure it is gone.
  } finally {
    own?.close("the worker was shut down");
    client?.close("the worker was shut down");
  }
  if (!(await waitForExit(info.pid, 15_000))) {
    signal(info.pid, "SIGTERM");
    if (!(await waitForExit(info.pid, 5_000))) {
      signal(info.pid, "SIGKILL");
      if (!(await waitForExit(info.pid, 5_000))) throw new Error(`The worker (pid ${info.pid}) did not exit even after SIGKILL`);
    }
  }
  // A worker that was killed could not remove its own runtime file.
  removeStaleRuntimeFile(runtimeFile, info.pid);
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    // Exited in between.
  }
}

export async function waitForExit(pid: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (isPidAlive(pid)) {
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 50));
  }
  return true;
}
