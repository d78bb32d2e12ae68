import { existsSync, readFileSync, realpathSync } from "node:fs";
import { basename } from "node:path";
import { inspect } from "node:util";
import type { WorkerClient } from "../bridge/client";
import type { AdapterInfo as WireAdapterInfo, ModelInfo as WireModelInfo } from "../bridge/protocol.gen";
import type { DisplaySink } from "../display/sink";
import { ChatRequest, type ChatIO, type ChatSettings } from "./chat";
import { Conversation, type ConversationOptions, type MessageRunner } from "./conversation";
import { checkAdapters } from "./export";
import { MergeRequest } from "./merge";
import { checkMessages, toGenerateRequest, type Model } from "./model";
import { Reply } from "./reply";
import type { ModelTarget } from "./train";
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

function toAdapterInfo(a: WireAdapterInfo): AdapterInfo {
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
export class AdapterModel implements MessageRunner {
  /** The model the adapter sits on. */
  readonly base: Model;
  /** The adapter folder (absolute). */
  readonly adapterPath: string;
  readonly #target: ModelTarget;
  readonly #name: string | undefined;
  #info: AdapterInfo | undefined;

  constructor(base: Model, target: ModelTarget, adapter: AdapterSource, options: { name?: string } = {}) {
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

/** What `qwen.adapters` needs from the `qwen` object. */
export interface AdaptersHost {
  connection(): Promise<WorkerClient>;
  /** The Model object for a model the worker holds. */
  model(info: WireModelInfo, client: WorkerClient): Model;
}

/** `qwen.adapters`: LoRA adapters on the models the worker holds. */
export class Adapters {
  readonly #host: AdaptersHost;

  constructor(host: AdaptersHost) {
    this.#host = host;
  }

  /**
   * Loads an adapter folder onto its base model and returns the model view that answers with it.
   * The base is `options.model`, or else the loaded model the adapter was trained on (from its
   * adapter_config.json).
   */
  async load(path: string, options: { model?: Model; name?: string } = {}): Promise<AdapterModel> {
    const o = expectKnownKeys("adapters.load(path, options)", options, ["model", "name"]);
    const folder = adapterPath(expectString("adapters.load(path)", path, { nonEmpty: true }));
    const model = (o.model as Model | undefined) ?? (await this.#baseOf(folder));
    const view = model.withAdapter(folder, o.name === undefined ? {} : { name: o.name as string });
    await view.load();
    return view;
  }

  /** The adapters loaded on `model` in the worker. */
  async list(model: Model): Promise<AdapterInfo[]> {
    const client = await this.#host.connection();
    const reply = await client.request("adapter_list", { model_id: model.id });
    return reply.adapters.map(toAdapterInfo);
  }

  async #baseOf(folder: string): Promise<Model> {
    const config = JSON.parse(readFileSync(`${folder}/adapter_config.json`, "utf8")) as { base_model_name_or_path?: unknown };
    const base = typeof config.base_model_name_or_path === "string" ? config.base_model_name_or_path : undefined;
    const client = await this.#host.connection();
    const { models } = await client.request("status", {});
    const wanted = base === undefined ? undefined : existsSync(base) ? realpathSync(base) : base;
    const matches = models.filter((m) => wanted !== undefined && (m.path === wanted || m.source === wanted));
    if (matches.length === 1) return this.#host.model(matches[0], client);
    const loaded = models.map((m) => m.model_id).join(", ") || "none";
    if (matches.length > 1) {
      throw new Error(
        `${folder} fits several loaded models (${matches.map((m) => m.model_id).join(", ")}); pick one: ` +
          "qwen.adapters.load(path, { model: m }) or m.withAdapter(path)",
      );
    }
    throw new Error(
      `${folder} was trained on ${base ?? "an unnamed base model"}, which is not loaded in the worker (loaded: ${loaded}). ` +
        `Load it first (const m = await qwen.load(${JSON.stringify(base ?? "...")})), or pass the base: qwen.adapters.load(path, { model: m })`,
    );
  }
}

function chatMessages(prompt: string, system: string | undefined): ChatMessage[] {
  const out: ChatMessage[] = system === undefined ? [] : [{ role: "system", content: system }];
  out.push({ role: "user", content: prompt });
  return out;
}
