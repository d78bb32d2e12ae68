// Eager checks for builder and option values, so a wrong value fails in the cell that wrote it,
// before anything reaches the worker, with a message naming the option and the value given.

function describe(value: unknown): string {
  if (typeof value === "string") return `the string ${JSON.stringify(value.length > 40 ? value.slice(0, 40) + "…" : value)}`;
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  if (typeof value === "object") return "an object";
  return `${typeof value} ${String(value)}`;
}

export function expectString(name: string, value: unknown, { nonEmpty = false } = {}): string {
  if (typeof value !== "string") throw new TypeError(`${name} expects a string, got ${describe(value)}`);
  if (nonEmpty && value.length === 0) throw new RangeError(`${name} must not be empty`);
  return value;
}

/**
 * A prompt to send: a string with something in it besides whitespace. An empty prompt would still
 * be answered (the model continues from the bare chat template), so it is refused here instead.
 */
export function expectPrompt(name: string, value: unknown, example: string): string {
  const text = expectString(name, value);
  if (text.trim() === "") {
    const got = text === "" ? "an empty string" : `only whitespace (${JSON.stringify(text.length > 20 ? text.slice(0, 20) + "…" : text)})`;
    throw new RangeError(`${name} got ${got}; pass the text to send, e.g. ${example}`);
  }
  return text;
}

export function expectBoolean(name: string, value: unknown): boolean {
  if (typeof value !== "boolean") throw new TypeError(`${name} expects true or false, got ${describe(value)}`);
  return value;
}

export function expectNumber(
  name: string,
  value: unknown,
  range: { min?: number; max?: number; above?: number; hint?: string } = {},
): number {
  if (typeof value !== "number") throw new TypeError(`${name} expects a number, got ${describe(value)}`);
  if (!Number.isFinite(value)) throw new RangeError(`${name} must be a finite number, got ${value}`);
  const hint = range.hint ? ` (${range.hint})` : "";
  if (range.above !== undefined && !(value > range.above)) throw new RangeError(`${name} must be greater than ${range.above}, got ${value}${hint}`);
  if (range.min !== undefined && value < range.min) throw new RangeError(`${name} must be at least ${range.min}, got ${value}${hint}`);
  if (range.max !== undefined && value > range.max) throw new RangeError(`${name} must be at most ${range.max}, got ${value}${hint}`);
  return value;
}

export function expectInteger(name: string, value: unknown, range: { min?: number; max?: number; hint?: string } = {}): number {
  expectNumber(name, value);
  if (!Number.isSafeInteger(value)) throw new RangeError(`${name} must be a whole number, got ${String(value)}`);
  return expectNumber(name, value, range);
}

export function expectOneOf<T extends string>(name: string, value: unknown, allowed: readonly T[]): T {
  const list = allowed.map((a) => JSON.stringify(a)).join(", ");
  if (typeof value !== "string") throw new TypeError(`${name} expects one of ${list}, got ${describe(value)}`);
  if (!(allowed as readonly string[]).includes(value)) throw new RangeError(`${name} must be one of ${list}, got ${JSON.stringify(value)}`);
  return value as T;
}

/** Rejects option keys that are not known, catching typos like `{ dtpye: "bf16" }`. */
export function expectKnownKeys(name: string, value: unknown, known: readonly string[]): Record<string, unknown> {
  if (value === undefined) return {};
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new TypeError(`${name} expects an options object, got ${describe(value)}`);
  }
  for (const key of Object.keys(value)) {
    if (!known.includes(key)) {
      throw new TypeError(`${name} has no option "${key}"; known options: ${known.join(", ")}`);
    }
  }
  return value as Record<string, unknown>;
}
