import { inspect } from "node:util";
import type { WorkerClient } from "../bridge/client";
import type { GenerateRequest, LoadRequest, ModelInfo as WireModelInfo } from "../bridge/protocol.gen";
import type { DisplaySink } from "../display/sink";
import { ChatRequest, type ChatIO, type ChatSettings } from "./chat";
import { Conversation, type ConversationOptions } from "./conversation";
import { Reply } from "./reply";
import type { ChatMessage, ModelInfo } from "./types";
import { expectKnownKeys, expectString } from "./validate";

/** What a model needs from the `qwen` object that loaded it. */
export interface ModelHost {
  /** The live connection, reconnecting (and starting a worker) if the old one is gone. */
  connection(): Promise<WorkerClient>;
  /** Sends `load` and prints its progress; used again when the worker was restarted. */
  loadOn(client: WorkerClient, request: LoadRequest, quiet: boolean): Promise<WireModelInfo>;
  sink(): DisplaySink;
}

export function toModelInfo(m: WireModelInfo): ModelInfo {
  return {
    id: m.model_id,
    source: m.source,
    path: m.path,
    architecture: m.architecture,
    parameters: m.parameters,
    dtype: m.dtype,
    device: m.device,
    contextLength: m.context_length,
    vocabSize: m.vocab_size,
    hasChatTemplate: m.has_chat_template,
    ...(m.load_seconds === undefined ? {} : { loadSeconds: m.load_seconds }),
  };
}

/** A model resident in the worker. Cheap to hold: the weights live in the worker, not here. */
export class Model {
  readonly #host: ModelHost;
  readonly #load: LoadRequest;
  #info: ModelInfo;
  #workerPid: number;

  constructor(host: ModelHost, info: WireModelInfo, load: LoadRequest, workerPid: number) {
    this.#host = host;
    this.#info = toModelInfo(info);
    this.#load = load;
    this.#workerPid = workerPid;
  }

  /** The handle the worker knows this model by. */
  get id(): string {
    return this.#info.id;
  }

  /** Where awaited replies stream: the sink of the `qwen` object that loaded this model. */
  readonly sink = (): DisplaySink => this.#host.sink();

  get info(): ModelInfo {
    return { ...this.#info };
  }

  /** A one-turn chat; chain options, then await it (or call .stream()). */
  chat(prompt: string): ChatRequest {
    return new ChatRequest(
      { label: this.id, sink: this.sink, run: (p, settings, io) => this.generate(chatMessages(p, settings.system), settings, io) },
      prompt,
    );
  }

  /** A multi-turn chat that keeps its history. */
  conversation(options: ConversationOptions = {}): Conversation {
    const o = expectKnownKeys("conversation(options)", options, ["system"]);
    if (o.system !== undefined) expectString("conversation({ system })", o.system);
    return new Conversation(this, options);
  }

  /** Frees the model's memory in the worker. */
  async unload(): Promise<boolean> {
    const client = await this.#host.connection();
    if (client.info.pid !== this.#workerPid) return false;
    return (await client.request("unload", { model_id: this.id })).unloaded;
  }

  /** Runs a generation on an explicit message list (what chat and conversation build). */
  async generate(messages: ChatMessage[], settings: Readonly<ChatSettings>, io: ChatIO = {}): Promise<Reply> {
    const client = await this.#host.connection();
    if (client.info.pid !== this.#workerPid) {
      // The worker was restarted (crash, `worker stop`): its models are gone, so load this one again.
      this.#host.sink().text(`qwenbook: the worker was restarted; loading ${this.#load.model} again\n`);
      this.#info = toModelInfo(await this.#host.loadOn(client, this.#load, true));
      this.#workerPid = client.info.pid;
    }
    const reply = await client.request("generate", toGenerateRequest(this.id, messages, settings), {
      onEvent: (event) => io.onText?.(event.content.text),
      signal: io.signal,
    });
    return Reply.fromWire(reply, this.id);
  }

  toString(): string {
    const i = this.#info;
    return `Model(${i.id}, ${i.architecture}, ${formatCount(i.parameters)} parameters, ${i.dtype} on ${i.device})`;
  }
}

Object.defineProperty(Model.prototype, inspect.custom, {
  value(this: Model): string {
    return this.toString();
  },
});

function chatMessages(prompt: string, system: string | undefined): ChatMessage[] {
  const out: ChatMessage[] = system === undefined ? [] : [{ role: "system", content: system }];
  out.push({ role: "user", content: prompt });
  return out;
}

export function toGenerateRequest(modelId: string, messages: ChatMessage[], s: Readonly<ChatSettings>): GenerateRequest {
  const req: GenerateRequest = { model_id: modelId, messages, stream: true };
  if (s.maxTokens !== undefined) req.max_tokens = s.maxTokens;
  if (s.temperature !== undefined) req.temperature = s.temperature;
  if (s.topP !== undefined) req.top_p = s.topP;
  if (s.topK !== undefined) req.top_k = s.topK;
  if (s.greedy !== undefined) req.greedy = s.greedy;
  if (s.stop !== undefined) req.stop = [...s.stop];
  if (s.seed !== undefined) req.seed = s.seed;
  return req;
}

export function formatCount(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}K`;
  return String(n);
}
