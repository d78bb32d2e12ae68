import { basename } from "node:path";
import { inspect } from "node:util";
import type { WorkerClient } from "../bridge/client";
import type { AdapterInfo as WireAdapterInfo } from "../bridge/protocol.gen";
import type { DisplaySink } from "../display/sink";
import { ChatRequest, type ChatIO, type ChatSettings } from "./chat";
import { Conversation, type ConversationOptions, type MessageRunner } from "./conversation";
import { checkAdapters } from "./export";
import { MergeRequest } from "./merge";
import { TrainRun } from "./train";
import type { PreferenceRunOptions } from "./train-config";
import { chatMessages, checkMessages, toGenerateRequest } from "./generate-request";
import type { ModelHandle, ModelTarget } from "./model-handle";
import { Reply } from "./reply";
import { TrainResult } from "./train-result";
import type { ChatMessage } from "./types";
import { expectKnownKeys, expectString } from "./validate";

/** A LoRA adapter as loaded on a model in the worker. */
export interface AdapterInfo {
  /** The name generate requests use for it. */
  name: string;
  path: string;
  r?: number;
  alpha?: number;
  targets: string[];
  /** The base model it was trained on, as its adapter_config.json says. */
  baseModel?: string;
}

/**
 * What `m.withAdapter(...)` accepts: an adapter folder, a training result, or another adapter view.
 * `undefined` is accepted so that `m.withAdapter(result.adapter)` type-checks; it fails with the reason
 * (a full fine-tune writes a model, not an adapter).
 */
export type AdapterSource = string | TrainResult | AdapterModel | undefined;

export function toAdapterInfo(a: WireAdapterInfo): AdapterInfo {
  return {
    name: a.name,
    path: a.path,
    targets: [...a.targets],
    ...(a.r === undefined ? {} : { r: a.r }),
    ...(a.alpha === undefined ? {} : { alpha: a.alpha }),
    ...(a.base_model === undefined ? {} : { baseModel: a.base_model }),
  };
}

/** The adapter folder an AdapterSource names, checked to be a peft adapter folder; absolute. */
export function adapterPath(source: unknown, cwd: string = process.cwd()): string {
  if (source instanceof AdapterModel) return source.adapterPath;
  if (source instanceof TrainResult) {
    if (source.adapter === undefined) {
      throw new TypeError(`This run was a full fine-tune: it wrote a whole model (${source.modelPath}), not an adapter; load it with qwen.load(result.modelPath)`);
    }
    return source.adapter;
  }
  if (source === undefined) {
    throw new TypeError(
      "withAdapter(adapter) got undefined: a full fine-tune's result has no adapter (its whole model is in result.modelPath; " +
        "load it with qwen.load(result.modelPath)); otherwise pass the adapter folder a LoRA run wrote",
    );
  }
  if (typeof source !== "string") {
    throw new TypeError(`withAdapter(adapter) expects an adapter folder path, a TrainResult or an adapter view, got ${source === null ? "null" : typeof source}`);
  }
  return checkAdapters(source, "withAdapter(adapter)", cwd)[0];
}

/**
 * A loaded model answering with a LoRA adapter: `m.withAdapter("runs/huanhuan")`. It chats like the
 * model itself; the base weights are shared, so switching adapters (or going back to `m`, which
 * answers without any) costs no reload. The adapter is loaded on first use and reloaded when its
 * folder was written again by a later run.
 */
export class AdapterModel<Base extends ModelHandle = ModelHandle> implements MessageRunner {
  /** The model the adapter sits on: the Model itself for a view from `m.withAdapter` or `qwen.adapters.load`. */
  readonly base: Base;
  /** The adapter folder (absolute). */
  readonly adapterPath: string;
  readonly #target: ModelTarget;
  readonly #name: string | undefined;
  #info: AdapterInfo | undefined;

  constructor(base: Base, target: ModelTarget, adapter: AdapterSource, options: { name?: string } = {}) {
    this.base = base;
    this.#target = target;
    this.adapterPath = adapterPath(adapter);
    const o = expectKnownKeys("withAdapter(adapter, options)", options, ["name"]);
    if (o.name !== undefined) {
      const name = expectString("withAdapter option name", o.name, { nonEmpty: true });
      if (!/^[A-Za-z0-9_-]+$/.test(name)) throw new RangeError(`withAdapter option name must be letters, digits, "_" or "-", got ${JSON.stringify(name)}`);
      this.#name = name;
    }
  }

  /** How replies name their model: the base's handle and the adapter's folder. */
  get id(): string {
    return `${this.base.id}+${basename(this.adapterPath)}`;
  }

  /** The adapter as the worker reported it when it was last loaded. */
  get info(): AdapterInfo | undefined {
    return this.#info ? { ...this.#info, targets: [...this.#info.targets] } : undefined;
  }

  readonly sink = (): DisplaySink => this.#target.sink();

  /** A one-turn chat answered with the adapter; chain options, then await it (or call .stream()). */
  chat(prompt: string): ChatRequest {
    return new ChatRequest({ label: this.id, sink: this.sink, run: (p, settings, io) => this.generate(chatMessages(p, settings.system), settings, io) }, prompt);
  }

  /** A multi-turn chat answered with the adapter. */
  conversation(options: ConversationOptions = {}): Conversation {
    const o = expectKnownKeys("conversation(options)", options, ["system"]);
    if (o.system !== undefined) expectString("conversation({ system })", o.system);
    return new Conversation(this, options);
  }

  /** Loads the adapter onto the model now (chat does this by itself) and returns what the worker reports. */
  async load(): Promise<AdapterInfo> {
    const { client, modelId } = await this.#target.connect();
    await this.#ensure(client, modelId);
    return this.info!;
  }

  /**
   * Takes the adapter off the model in the worker; the base is untouched. Resolves to nothing (a
   * notebook cell ending in it shows no value); `qwen.adapters.list(model)` says what is left.
   */
  async unload(): Promise<void> {
    if (!this.#info) return;
    const { client, modelId } = await this.#target.connect();
    await client.request("adapter_unload", { model_id: modelId, name: this.#info.name });
    this.#info = undefined;
  }

  /**
   * Preference tuning that continues this adapter (an SFT run's): `sft.preference({ method: "dpo" })`. The
   * adapter is the starting point and, for DPO, the reference (the model before preference tuning, as TRL
   * and LLaMA-Factory take it); the result is a new adapter in the run folder, this folder is left as it is.
   */
  preference(options: PreferenceRunOptions = {}): TrainRun {
    return TrainRun.preference(this.#target, options, this.adapterPath);
  }

  /** The base with this adapter folded in; call `.save(path)` or `.export(file.gguf)` on it. */
  merge(): MergeRequest {
    return new MergeRequest(this.base, this.adapterPath);
  }

  async generate(messages: ChatMessage[], settings: Readonly<ChatSettings>, io: ChatIO = {}): Promise<Reply> {
    checkMessages("generate(messages)", messages); // before the adapter is loaded
    const { client, modelId } = await this.#target.connect();
    const name = await this.#ensure(client, modelId);
    io.onStart?.({ model: this.id, messages });
    const reply = await client.request(
      "generate",
      { ...toGenerateRequest(modelId, messages, settings), adapter: name },
      { onEvent: (event) => io.onText?.(event.content.text, event.content.index + event.content.token_ids.length), signal: io.signal },
    );
    return Reply.fromWire(reply, this.id);
  }

  /**
   * Asks the worker to load the adapter before each use: a no-op when it is there already, and what
   * brings it back after a worker restart, an unload from another notebook, or a run that wrote the
   * folder again.
   */
  async #ensure(client: WorkerClient, modelId: string): Promise<string> {
    const reply = await client.request("adapter_load", { model_id: modelId, path: this.adapterPath, ...(this.#name ? { name: this.#name } : {}) });
    this.#info = toAdapterInfo(reply.adapter);
    return reply.adapter.name;
  }

  toString(): string {
    return `AdapterModel(${this.base.id} + ${this.adapterPath})`;
  }
}

Object.defineProperty(AdapterModel.prototype, inspect.custom, {
  value(this: AdapterModel): string {
    return this.toString();
  },
});
