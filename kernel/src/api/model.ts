import { inspect } from "node:util";
import type { WorkerClient } from "../bridge/client";
import { ModelNotLoadedError } from "../bridge/errors";
import type { LoadRequest, ModelInfo as WireModelInfo } from "../bridge/protocol.gen";
import type { DisplaySink } from "../display/sink";
import { AdapterModel, type AdapterSource } from "./adapters";
import { ChatRequest, type ChatIO, type ChatSettings } from "./chat";
import { Conversation, type ConversationOptions } from "./conversation";
import { chatMessages, checkMessages, toGenerateRequest } from "./generate-request";
import { exportRequest, runExport, saveRequest, type ExportOptions, type ExportTarget, type SaveOptions } from "./export";
import { MergeRequest } from "./merge";
import type { ModelTarget } from "./model-handle";
import { toQuantInfo, type ExportReport } from "./report";
import { Reply } from "./reply";
import { serveRequest, startServer, type ServeOptions, type Server } from "./serve";
import { GpuGauge } from "./gpu";
import { TrainRun } from "./train";
import type { PreferenceRunOptions } from "./train-config";
import type { LoraOptions } from "./train-config";
import type { ChatMessage, ModelInfo } from "./types";
import { expectBoolean, expectKnownKeys, expectString } from "./validate";

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
    devices: m.devices ?? [m.device],
    contextLength: m.context_length,
    vocabSize: m.vocab_size,
    hasChatTemplate: m.has_chat_template,
    ...(m.load_seconds === undefined ? {} : { loadSeconds: m.load_seconds }),
    ...(m.quant === undefined ? {} : { quant: toQuantInfo(m.quant) }),
  };
}

/** A model resident in the worker. Cheap to hold: the weights live in the worker, not here. */
export class Model {
  readonly #host: ModelHost;
  /** Set by unload(): the handle refuses further work (another notebook may still hold the weights). */
  #unloaded = false;
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

  /**
   * Frees the model's memory in the worker. While another notebook (another kernel connected to the
   * same worker) still uses the model, only this notebook's use of it ends and the model stays
   * loaded for the other one; `{ force: true }` frees it for everyone. A notebook whose kernel has
   * exited or crashed no longer counts.
   */
  async unload(options: { force?: boolean } = {}): Promise<void> {
    const o = expectKnownKeys("unload(options)", options, ["force"]);
    const force = o.force === undefined ? false : expectBoolean("unload option force", o.force);
    const client = await this.#host.connection();
    // From here on this handle is done in this notebook, even where another notebook keeps the weights loaded.
    this.#unloaded = true;
    if (client.info.pid !== this.#workerPid) return; // the worker was restarted: the model is gone already
    const reply = await client.request("unload", { model_id: this.id, ...(force ? { force } : {}) });
    const others = reply.other_users ?? 0;
    if (others === 0) return;
    const notebooks = others === 1 ? "1 other notebook" : `${others} other notebooks`;
    this.#host
      .sink()
      .text(
        reply.unloaded
          ? `${this.id} unloaded (force), also for the ${notebooks} using it\n`
          : `${this.id} is still used by ${notebooks}; unloaded from this one (the memory is freed when the last one unloads it, or with m.unload({ force: true }))\n`,
      );
  }

  /**
   * Saves the model as a folder that plain transformers loads: sharded safetensors with their
   * index, config, generation config, tokenizer and chat template. With `quant` the weights are
   * saved int8/int4 (reloaded by `qwen.load`); a model loaded quantized is saved quantized.
   */
  save(path: string, options: SaveOptions = {}): Promise<ExportReport> {
    return this.#write("save", () => saveRequest(path, options));
  }

  /** Writes the model as one GGUF file for llama.cpp / Ollama / LM Studio. */
  export(path: string, options: ExportOptions = {}): Promise<ExportReport> {
    return this.#write("export", () => exportRequest(path, options));
  }

  /** This model with LoRA adapter folder(s) folded in; call `.save()` or `.export()` on the result. */
  merge(options: { adapter: string | readonly string[] }): MergeRequest {
    const o = expectKnownKeys("merge(options)", options, ["adapter"]);
    if (o.adapter === undefined) {
      throw new TypeError('merge() needs the adapter to fold in: model.merge({ adapter: "runs/x/adapter" }) (the folder training wrote)');
    }
    return new MergeRequest(this, o.adapter as string | readonly string[]);
  }

  /**
   * Serves this model as an OpenAI-compatible HTTP API (chat and text completions, streaming, a
   * models list) from the worker, sharing the loaded weights. `server.url` is the `baseURL` for
   * OpenAI clients; `await server.stop()` frees the port and keeps the model loaded. While it
   * runs, this model's own chat pauses the server's batch for its length instead of waiting.
   */
  serve(options: ServeOptions = {}): Promise<Server> {
    const request = serveRequest(options); // options fail here, before anything is sent
    const host = { connection: () => this.#host.connection(), sink: this.sink };
    return startServer(host, async () => ({ client: await this.#ready(), modelId: this.id }), request);
  }

  /**
   * A LoRA fine-tuning run on this model: chain `.dataset(...)` and options, then
   * `await run.train()` (live dashboard; the interrupt button cancels into a checkpoint).
   */
  lora(options: LoraOptions = {}): TrainRun {
    return TrainRun.lora(this.#trainTarget(), options);
  }

  /** A full-parameter fine-tuning run on this model (every weight is trained; needs far more memory than LoRA). */
  fullFinetune(): TrainRun {
    return TrainRun.full(this.#trainTarget());
  }

  /**
   * A preference-tuning run on chosen/rejected pairs: `m.preference({ method: "dpo", beta: 0.1 })` (or "orpo",
   * "simpo"), LoRA by default (`full: true` trains every weight); chain `.dataset(...)` of
   * `{ prompt | messages, chosen, rejected }` rows and the usual options, then `await run.train()`. To tune an
   * SFT adapter, use `m.withAdapter(sft).preference(...)`.
   */
  preference(options: PreferenceRunOptions = {}): TrainRun {
    return TrainRun.preference(this.#trainTarget(), options);
  }

  /**
   * This model answering with a LoRA adapter (a folder training wrote, or a TrainResult). The base
   * weights are shared: `m` itself keeps answering without the adapter, and switching costs no reload.
   */
  withAdapter(adapter: AdapterSource, options: { name?: string } = {}): AdapterModel<Model> {
    return new AdapterModel(this, this.#trainTarget(), adapter, options);
  }

  #trainTarget(): ModelTarget {
    return {
      model: this,
      sink: this.sink,
      connect: async () => ({ client: await this.#ready(), modelId: this.id }),
      gauge: (sink) => new GpuGauge({ connection: () => this.#host.connection(), sink: () => sink }),
    };
  }

  async #write(kind: "save" | "export", build: () => { body: Parameters<typeof runExport>[2]; quiet: boolean }): Promise<ExportReport> {
    const { body, quiet } = build(); // options fail here, before anything is sent
    const target: ExportTarget = { label: this.id, sink: this.sink, connect: async () => ({ client: await this.#ready(), modelId: this.id }) };
    return runExport(target, kind, body, quiet);
  }

  /** The connection, with this model loaded in its worker. */
  async #ready(): Promise<WorkerClient> {
    if (this.#unloaded) {
      throw new ModelNotLoadedError(`${this.id} was unloaded in this notebook (m.unload()); load it again with qwen.load(${JSON.stringify(this.#load.model)}) to use it`);
    }
    const client = await this.#host.connection();
    if (client.info.pid !== this.#workerPid) {
      // The worker was restarted (crash, `worker stop`): its models are gone, so load this one again.
      this.#host.sink().text(`qwenbook: the worker was restarted; loading ${this.#load.model} again\n`);
      this.#info = toModelInfo(await this.#host.loadOn(client, this.#load, true));
      this.#workerPid = client.info.pid;
    }
    return client;
  }

  /** Runs a generation on an explicit message list (what chat and conversation build). */
  async generate(messages: ChatMessage[], settings: Readonly<ChatSettings>, io: ChatIO = {}): Promise<Reply> {
    checkMessages("generate(messages)", messages); // before a restarted worker is made to reload
    const request = toGenerateRequest(this.id, messages, settings);
    // The chat is shown before the worker is asked, so a model that cannot answer (unloaded here, a worker
    // that will not reload it) fails inside its bubble.
    io.onStart?.({ model: this.id, messages });
    const client = await this.#ready();
    const reply = await client.request("generate", request, {
      onEvent: (event) => {
        const { text, reasoning, tool_calls: calls, index, token_ids: ids } = event.content;
        const tokens = index + ids.length;
        if (reasoning) io.onReasoning?.(reasoning, tokens);
        if (text) io.onText?.(text, tokens);
        for (const call of calls ?? []) io.onToolCall?.({ ...call });
      },
      signal: io.signal,
    });
    return Reply.fromWire(reply, this.id);
  }

  toString(): string {
    const i = this.#info;
    return `Model(${i.id}, ${i.architecture}, ${formatCount(i.parameters)} parameters, ${i.dtype} on ${i.devices.join(" + ")})`;
  }
}

Object.defineProperty(Model.prototype, inspect.custom, {
  value(this: Model): string {
    return this.toString();
  },
});

export function formatCount(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}K`;
  return String(n);
}
