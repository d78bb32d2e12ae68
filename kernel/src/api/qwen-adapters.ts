// `qwen.adapters`: loading adapter folders onto the models the worker holds. It sits above model.ts (it
// asks a Model for its adapter view), where the view itself, adapters.ts, sits below it.
import { existsSync, readFileSync, realpathSync } from "node:fs";
import type { WorkerClient } from "../bridge/client";
import type { ModelInfo as WireModelInfo } from "../bridge/protocol.gen";
import { adapterPath, toAdapterInfo, type AdapterInfo, type AdapterModel } from "./adapters";
import type { Model } from "./model";
import { expectKnownKeys, expectString } from "./validate";

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
  async load(path: string, options: { model?: Model; name?: string } = {}): Promise<AdapterModel<Model>> {
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
