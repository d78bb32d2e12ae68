// The notebook's early check of preference rows ({ prompt | messages, chosen, rejected }), the same rules
// as the worker's (python-bridge/qwenbook_bridge/engine/data/preference_data.py: row_to_pair): a row
// accepted here is accepted there, and the error names the same row and field. The worker checks every row
// again.
import { DatasetRowError } from "./dataset-rows";

/** A preference row: the user's `prompt` (or a `messages` history ending with the user's turn) and two answers. */
export interface PreferenceRow {
  prompt?: string;
  messages?: ReadonlyArray<{ role: "system" | "user" | "assistant"; content: string }>;
  system?: string;
  /** The preferred answer: a string or an assistant message. */
  chosen: string | { role: "assistant"; content: string };
  rejected: string | { role: "assistant"; content: string };
}

const ROLES: Record<string, "user" | "assistant" | "system"> = { user: "user", human: "user", assistant: "assistant", gpt: "assistant", system: "system" };

interface Problem {
  field?: string;
  reason: string;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function typeName(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "list";
  return typeof value === "number" ? (Number.isInteger(value) ? "int" : "float") : typeof value === "string" ? "str" : typeof value === "boolean" ? "bool" : "dict";
}

function answerProblem(value: unknown, key: string): Problem | undefined {
  if (value === undefined || value === null) return { field: key, reason: "is missing" };
  if (typeof value === "string") return value.trim() ? undefined : { field: key, reason: "is empty" };
  const message = Array.isArray(value) && value.length === 1 ? value[0] : value;
  if (!isObject(message)) return { field: key, reason: `must be a string or an assistant message {role, content}, got ${typeName(value)}` };
  const role = message.role ?? message.from ?? "assistant";
  if (ROLES[String(role).toLowerCase()] !== "assistant") return { field: `${key}.role`, reason: `must be the assistant's message, got role ${JSON.stringify(role)}` };
  const content = message.content ?? message.value;
  if (typeof content !== "string" || !content.trim()) return { field: `${key}.content`, reason: "must be a non-empty string" };
  return undefined;
}

function historyProblem(value: unknown): Problem | undefined {
  if (!Array.isArray(value) || value.length === 0) return { field: "messages", reason: "must be a non-empty list of {role, content} turns ending with the user's" };
  let previous: string | undefined;
  for (const [i, turn] of value.entries()) {
    const where = `messages[${i}]`;
    if (!isObject(turn)) return { field: where, reason: `must be an object, got ${typeName(turn)}` };
    const raw = turn.role ?? turn.from;
    const role = typeof raw === "string" ? ROLES[raw.toLowerCase()] : undefined;
    if (role === undefined) return { field: `${where}.role`, reason: `unknown role ${JSON.stringify(raw)}; use user, assistant or system` };
    const content = turn.content ?? turn.value;
    if (typeof content !== "string") return { field: `${where}.content`, reason: `must be a string, got ${typeName(content)}` };
    if (role === "system") {
      if (previous !== undefined) return { field: `${where}.role`, reason: "a system turn may only come first" };
    } else {
      const expected = previous === "user" ? "assistant" : "user";
      if (role !== expected) return { field: `${where}.role`, reason: `turns must alternate user/assistant starting with the user; expected ${expected} here, got ${JSON.stringify(raw)}` };
    }
    previous = role;
  }
  if (previous !== "user") return { field: `messages[${value.length - 1}]`, reason: "must end with the user's turn (chosen and rejected are the answers to it)" };
  return undefined;
}

/** What the worker would refuse in one preference row, or undefined. */
export function preferenceProblem(row: unknown): Problem | undefined {
  if (!isObject(row)) return { reason: `must be an object, got ${typeName(row)}` };
  const hasPrompt = row.prompt !== undefined && row.prompt !== null;
  const hasMessages = row.messages !== undefined && row.messages !== null;
  if (hasPrompt === hasMessages) {
    return { field: "prompt", reason: 'give exactly one of "prompt" (the user\'s message) and "messages" (a history ending with the user\'s turn)' };
  }
  if (hasPrompt) {
    if (Array.isArray(row.prompt)) {
      // TRL's conversational prompt: a list of turns, checked (and named) as a messages history.
      const p = historyProblem(row.prompt);
      if (p) return p;
    } else if (typeof row.prompt !== "string" || !row.prompt.trim()) {
      return { field: "prompt", reason: "must be a non-empty string" };
    }
  } else {
    const p = historyProblem(row.messages);
    if (p) return p;
  }
  if (row.system !== undefined && row.system !== null && typeof row.system !== "string") return { field: "system", reason: `must be a string, got ${typeName(row.system)}` };
  return answerProblem(row.chosen, "chosen") ?? answerProblem(row.rejected, "rejected");
}

/** Throws a DatasetRowError for the first row the worker would refuse. */
export function checkPreferenceRows(file: string, rows: ReadonlyArray<readonly [number, unknown]>): void {
  for (const [n, row] of rows) {
    const problem = preferenceProblem(row);
    if (!problem) continue;
    const hint = isObject(row) && ("instruction" in row || "conversations" in row) ? "; this looks like supervised rows: train them with m.lora() or m.fullFinetune()" : "";
    throw new DatasetRowError(file, n, problem.field, `${problem.reason}${hint}`);
  }
}
