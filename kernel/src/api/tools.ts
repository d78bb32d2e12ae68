// Checking tools and tool messages in the notebook, before a request goes out, so a mistake names the
// call and the field; the worker checks the same rules again (engine/generate/chat_prompt.py).
import type { ToolCall, ToolSpec } from "./types";

const TOOL_NAME = /^[A-Za-z0-9_.-]{1,64}$/;

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** The tools, checked: a list of `{ name, description?, parameters? }` with distinct names. */
export function checkTools(name: string, list: unknown): ToolSpec[] {
  if (!Array.isArray(list)) throw new TypeError(`${name} expects a list of { name, description, parameters } tools`);
  if (list.length > 128) throw new RangeError(`${name} takes at most 128 tools, got ${list.length}`);
  const seen = new Set<string>();
  return list.map((tool: unknown, i: number) => {
    const where = `${name}[${i}]`;
    if (!isObject(tool)) throw new TypeError(`${where} must be an object { name, description, parameters }`);
    const { name: toolName, description, parameters } = tool;
    if (typeof toolName !== "string" || !TOOL_NAME.test(toolName)) {
      throw new TypeError(`${where}.name must be 1-64 letters, digits, _ . or -, got ${JSON.stringify(toolName)}`);
    }
    if (seen.has(toolName)) throw new RangeError(`${where} repeats the name "${toolName}"; each tool needs its own`);
    seen.add(toolName);
    if (description !== undefined && typeof description !== "string") throw new TypeError(`${where}.description must be a string`);
    if (parameters !== undefined && !isObject(parameters)) {
      throw new TypeError(`${where}.parameters must be a JSON Schema object, e.g. { type: "object", properties: { city: { type: "string" } } }`);
    }
    const out: ToolSpec = { name: toolName };
    if (description !== undefined) out.description = description;
    if (parameters !== undefined) out.parameters = parameters;
    return out;
  });
}

/** An assistant message's calls, checked. */
export function checkToolCalls(name: string, calls: unknown): ToolCall[] {
  if (!Array.isArray(calls)) throw new TypeError(`${name} must be a list of { name, arguments }`);
  return calls.map((c: unknown, i: number) => {
    if (!isObject(c) || typeof c.name !== "string" || !c.name || !isObject(c.arguments)) {
      throw new TypeError(`${name}[${i}] must be { name: string, arguments: object }, as reply.toolCalls gives them`);
    }
    const call: ToolCall = { name: c.name, arguments: c.arguments };
    if (typeof c.id === "string") call.id = c.id;
    return call;
  });
}
