// A value a widget has already drawn (a chat reply in its bubble, a preview, a server's final
// counters, an error in a chat bubble) must not be printed again by the kernel as the cell's last
// value or as the cell's error. The display layer marks such objects; the kernel's printer skips them.

/** Well-known key: set (non-enumerable, true) on objects a widget has rendered. */
export const SHOWN: unique symbol = Symbol.for("qwenbook.shown");

/** Marks `value` as already rendered by a widget and returns it. Primitives are left as they are. */
export function markShown<T>(value: T): T {
  if ((typeof value === "object" && value !== null) || typeof value === "function") {
    if (Object.isExtensible(value) || Object.prototype.hasOwnProperty.call(value, SHOWN)) {
      try {
        Object.defineProperty(value, SHOWN, { value: true, enumerable: false, configurable: true });
      } catch {
        // A proxy or exotic object that refuses the property is simply printed as before.
      }
    }
  }
  return value;
}

/** True when a widget has rendered `value` (see markShown). */
export function isShown(value: unknown): boolean {
  if ((typeof value !== "object" || value === null) && typeof value !== "function") return false;
  try {
    return (value as { [SHOWN]?: unknown })[SHOWN] === true;
  } catch {
    return false;
  }
}
