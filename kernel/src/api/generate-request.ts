// What a chat turns into on the wire: the checked message list and the `generate` request. Shared by a
// model and its adapter views, which differ only in where the request goes.
import type { ChatMessage as WireMessage, GenerateRequest } from "../bridge/protocol.gen";
import type { ChatSettings } from "./chat";
import { checkToolCalls } from "./tools";
import type { ChatMessage } from "./types";
import { expectOneOf, expectPrompt, expectString } from "./validate";

/** The messages of a one-turn chat: the system prompt, if any, then the user's prompt. */
export function chatMessages(prompt: string, system: string | undefined): ChatMessage[] {
  const out: ChatMessage[] = system === undefined ? [] : [{ role: "system", content: system }];
  out.push({ role: "user", content: prompt });
  return out;
}

/**
 * Checks a message list before it is sent: at least one message, each a known role with string
 * content, and no blank user message (the model would answer the bare template, which is never
 * what was meant). Assistant and system text may be empty, as in the OpenAI API.
 */
export function checkMessages(name: string, messages: unknown): ChatMessage[] {
  if (!Array.isArray(messages)) throw new TypeError(`${name} expects a list of { role, content } messages, got ${messages === null ? "null" : typeof messages}`);
  if (messages.length === 0) {
    throw new RangeError(`${name} got an empty list; send at least one message, e.g. [{ role: "user", content: "What is LoRA?" }]`);
  }
  messages.forEach((m: unknown, i: number) => {
    const where = `${name}[${i}]`;
    if (typeof m !== "object" || m === null || Array.isArray(m)) throw new TypeError(`${where} must be an object { role, content }`);
    const { role, content, toolCalls, toolCallId, name: toolName } = m as Record<string, unknown>;
    expectOneOf(`${where}.role`, role, ["system", "user", "assistant", "tool"] as const);
    expectString(`${where}.content`, content);
    if (role === "user") expectPrompt(`${where}.content`, content, '{ role: "user", content: "What is LoRA?" }');
    if (toolCalls !== undefined) {
      if (role !== "assistant") throw new TypeError(`${where}.toolCalls: only an assistant message carries tool calls`);
      checkToolCalls(`${where}.toolCalls`, toolCalls);
    }
    if (toolCallId !== undefined) expectString(`${where}.toolCallId`, toolCallId);
    if (toolName !== undefined) expectString(`${where}.name`, toolName);
  });
  return messages as ChatMessage[];
}

/** A message as the wire spells it (snake_case fields). */
function toWire(m: ChatMessage): WireMessage {
  const out: WireMessage = { role: m.role, content: m.content };
  if (m.toolCalls?.length) out.tool_calls = m.toolCalls.map((c) => ({ ...c }));
  if (m.toolCallId !== undefined) out.tool_call_id = m.toolCallId;
  if (m.name !== undefined) out.name = m.name;
  return out;
}

/** The streamed `generate` request for `messages` under the chat settings `s`, addressed to `modelId`. */
export function toGenerateRequest(modelId: string, messages: ChatMessage[], s: Readonly<ChatSettings>): GenerateRequest {
  checkMessages("generate(messages)", messages);
  const req: GenerateRequest = { model_id: modelId, messages: messages.map(toWire), stream: true };
  if (s.maxTokens !== undefined) req.max_tokens = s.maxTokens;
  if (s.temperature !== undefined) req.temperature = s.temperature;
  if (s.topP !== undefined) req.top_p = s.topP;
  if (s.topK !== undefined) req.top_k = s.topK;
  if (s.minP !== undefined) req.min_p = s.minP;
  if (s.greedy !== undefined) req.greedy = s.greedy;
  if (s.stop !== undefined) req.stop = [...s.stop];
  if (s.seed !== undefined) req.seed = s.seed;
  if (s.thinking !== undefined) req.thinking = s.thinking;
  if (s.tools?.length) req.tools = s.tools.map((t) => ({ ...t }));
  return req;
}
