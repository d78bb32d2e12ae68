import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { addInterruptGrace } from "./interrupt-grace";

/**
 * A stand-in for tslab's executor: execute() runs a "cell" that awaits `cellDone`; tslab's own
 * interrupt() rejects the cell at once, as Promise.race in executor.js does.
 */
function fakeExecutor() {
  let finish: (ok: boolean) => void = () => undefined;
  const interrupt = vi.fn(() => finish(false));
  const executor = {
    execute: (_src: string) => new Promise<boolean>((resolve) => (finish = resolve)),
    interrupt,
  };
  return { executor, interrupt, cellEnds: (ok = true) => finish(ok) };
}

let inFlight = 0;
const cancelInFlight = vi.fn();

beforeEach(() => {
  vi.useFakeTimers();
  inFlight = 0;
  cancelInFlight.mockClear();
});

afterEach(() => {
  vi.useRealTimers();
});

function setup() {
  const fake = fakeExecutor();
  addInterruptGrace(fake.executor, { requestsInFlight: () => inFlight, cancelInFlight, graceMs: 3000, pollMs: 50 });
  return fake;
}

describe("addInterruptGrace", () => {
  it("lets a cell whose requests were cancelled end on their replies, and still reports it interrupted", async () => {
    const { executor, interrupt, cellEnds } = setup();
    inFlight = 1;
    const result = executor.execute("const story = await m.chat(...)");
    executor.interrupt();
    await vi.advanceTimersByTimeAsync(200);
    expect(interrupt).not.toHaveBeenCalled();
    // The cancelled reply arrives; the cell assigns it and finishes.
    inFlight = 0;
    cellEnds(true);
    await expect(result).resolves.toBe(false);
    await vi.advanceTimersByTimeAsync(5000);
    expect(interrupt).not.toHaveBeenCalled();
    expect(cancelInFlight).not.toHaveBeenCalled();
  });

  it("interrupts at once when no worker request is in flight, and on a second press", async () => {
    const first = setup();
    const r1 = first.executor.execute("await sleep()");
    first.executor.interrupt();
    expect(first.interrupt).toHaveBeenCalledTimes(1);
    await expect(r1).resolves.toBe(false);

    const second = setup();
    inFlight = 1;
    const r2 = second.executor.execute("await m.chat(...)");
    second.executor.interrupt();
    expect(second.interrupt).not.toHaveBeenCalled();
    second.executor.interrupt();
    expect(second.interrupt).toHaveBeenCalledTimes(1);
    await expect(r2).resolves.toBe(false);
  });

  it("interrupts once the requests are back if the cell goes on waiting for something else", async () => {
    const { executor, interrupt } = setup();
    inFlight = 1;
    const result = executor.execute("await m.chat(...); await sleep()");
    executor.interrupt();
    inFlight = 0;
    await vi.advanceTimersByTimeAsync(200);
    expect(interrupt).toHaveBeenCalledTimes(1);
    await expect(result).resolves.toBe(false);
  });

  it("gives up waiting after the grace time, then cancels what the cell started meanwhile", async () => {
    const { executor, interrupt } = setup();
    inFlight = 1;
    const result = executor.execute("while (true) await m.chat(...)");
    executor.interrupt();
    await vi.advanceTimersByTimeAsync(2900);
    expect(interrupt).not.toHaveBeenCalled();
    await vi.advanceTimersByTimeAsync(200);
    expect(interrupt).toHaveBeenCalledTimes(1);
    expect(cancelInFlight).toHaveBeenCalledTimes(1);
    await expect(result).resolves.toBe(false);
  });

  it("leaves a cell that was not interrupted alone", async () => {
    const { executor, cellEnds } = setup();
    const result = executor.execute("1 + 1");
    cellEnds(true);
    await expect(result).resolves.toBe(true);
  });
});
