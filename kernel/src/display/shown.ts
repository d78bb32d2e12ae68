// A value a widget has already drawn (a chat reply in its bubble, a preview, a server's final
// counters, an error in a chat bubble) must not be printed again by the kernel as the cell's last
// value or as the cell's error. The display layer marks such objects; the kernel's printer skips
// them in the cell that drew them. Named in a later cell, the value prints as usual: the widget
// is not in that cell.

/** Well-known key: set (non-enumerable) on objects a widget has rendered, to the cell it was in. */
export const SHOWN: unique symbol = Symbol.for("qwenbook.shown");

/** The kernel numbers its cell executions under this key; outside a kernel it stays unset (0). */
const CELL_KEY: unique symbol = Symbol.for("qwenbook.cell");

type GlobalWithCell = typeof globalThis & { [CELL_KEY]?: number };

function currentCell(): number {
  return (globalThis as GlobalWithCell)[CELL_KEY] ?? 0;
}

/** Called by the kernel as each cell starts executing. */
export function beginCell(): void {
  (globalThis as GlobalWithCell)[CELL_KEY] = currentCell() + 1;
}

/** Marks `value` as rendered by a widget in the current cell and returns it. Primitives are left as they are. */
export function markShown<T>(value: T): T {
  if ((typeof value === "object" && value !== null) || typeof value === "function") {
    if (Object.isExtensible(value) || Object.prototype.hasOwnProperty.call(value, SHOWN)) {
      try {
        Object.defineProperty(value, SHOWN, { value: currentCell(), enumerable: false, configurable: true });
      } catch {
        // A proxy or exotic object that refuses the property is simply printed as before.
      }
    }
  }
  return value;
}

/** True when a widget in the current cell has rendered `value` (see markShown). */
export function isShown(value: unknown): boolean {
  if ((typeof value !== "object" || value === null) && typeof value !== "function") return false;
  try {
    return (value as { [SHOWN]?: unknown })[SHOWN] === currentCell();
  } catch {
    return false;
  }
}
