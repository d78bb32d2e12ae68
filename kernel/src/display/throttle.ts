/**
 * Rate-limits in-place output updates. A fast model emits dozens of tokens a second and a training
 * run may log every step; each update re-renders the widget in the browser and travels over the
 * kernel's websocket, so intermediate values are coalesced and only the newest is sent.
 */
export interface Throttle<T> {
  /**
   * Offers a new value. It is delivered at once when the last delivery is at least one interval
   * old; otherwise it replaces any value still waiting, which goes out when the interval ends.
   */
  push(value: T): void;
  /**
   * Delivers `value` now (or, without one, whatever is still waiting) and stops: later pushes are
   * ignored. Call it when the stream ends so the output shows the final state.
   */
  finish(...value: [] | [T]): void;
  /** Drops any waiting value and stops without delivering. */
  cancel(): void;
  /** How many values were delivered so far. */
  readonly delivered: number;
}

export interface ThrottleOptions {
  /** Least time between deliveries; 50 ms is at most 20 updates a second. */
  intervalMs?: number;
}

export const DEFAULT_INTERVAL_MS = 50;

/**
 * Creates a throttle around `deliver`. A delivery that throws inside the timer is not lost: the
 * error is rethrown by the next `push` or `finish`, where the caller can handle it.
 */
export function createThrottle<T>(deliver: (value: T) => void, options: ThrottleOptions = {}): Throttle<T> {
  const interval = options.intervalMs ?? DEFAULT_INTERVAL_MS;
  if (!(Number.isFinite(interval) && interval >= 0)) {
    throw new RangeError(`throttle intervalMs must be a number of milliseconds >= 0, got ${String(interval)}`);
  }
  let lastAt = Number.NEGATIVE_INFINITY;
  let pending: { value: T } | undefined;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let stopped = false;
  let delivered = 0;
  let failure: { error: unknown } | undefined;

  const send = (value: T) => {
    lastAt = Date.now();
    delivered += 1;
    deliver(value);
  };

  const rethrow = () => {
    if (failure) {
      const { error } = failure;
      failure = undefined;
      throw error;
    }
  };

  const onTimer = () => {
    timer = undefined;
    if (!pending) return;
    const { value } = pending;
    pending = undefined;
    try {
      send(value);
    } catch (error) {
      failure = { error };
    }
  };

  return {
    push(value) {
      rethrow();
      if (stopped) return;
      const wait = lastAt + interval - Date.now();
      if (wait <= 0 && timer === undefined) {
        send(value);
        return;
      }
      pending = { value };
      timer ??= setTimeout(onTimer, Math.max(0, wait));
    },
    finish(...value) {
      if (stopped) return rethrow();
      stopped = true;
      if (timer !== undefined) clearTimeout(timer);
      timer = undefined;
      const last = value.length > 0 ? { value: value[0] as T } : pending;
      pending = undefined;
      // The final state matters most, so it goes out before an earlier timer failure is reported.
      if (last) send(last.value);
      rethrow();
    },
    cancel() {
      stopped = true;
      pending = undefined;
      if (timer !== undefined) clearTimeout(timer);
      timer = undefined;
    },
    get delivered() {
      return delivered;
    },
  };
}
