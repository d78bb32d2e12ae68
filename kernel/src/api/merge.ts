import { basename } from "node:path";
import { inspect } from "node:util";
import type { ExportOptions, SaveOptions } from "./export";
import { checkAdapters } from "./export";
import type { ModelHandle } from "./model-handle";
import type { ExportReport } from "./report";

/**
 * A base model with LoRA adapter folder(s) to fold into it. Nothing happens until `save` or
 * `export`: the worker attaches the adapters, writes base + adapter weights, and detaches them,
 * so the loaded model is left as it was.
 *
 * `model.merge({ adapter })` makes one; so can anything holding a model and an adapter folder,
 * e.g. a training result: `new MergeRequest(model, result.adapter)`.
 */
export class MergeRequest {
  readonly #model: ModelHandle;
  /** Absolute paths of the adapter folders, in the order they are added up. */
  readonly adapters: readonly string[];

  constructor(model: ModelHandle, adapter: string | readonly string[], cwd: string = process.cwd()) {
    this.#model = model;
    this.adapters = Object.freeze(checkAdapters(adapter, "merge({ adapter })", cwd));
  }

  /** Writes the merged model as a safetensors folder (shards + index + config + tokenizer). */
  save(path: string, options: Omit<SaveOptions, "adapter"> = {}): Promise<ExportReport> {
    return this.#model.save(path, { ...refuseAdapter("save", options), adapter: this.adapters });
  }

  /** Writes the merged model as one GGUF file for llama.cpp. */
  export(path: string, options: Omit<ExportOptions, "adapter"> = {}): Promise<ExportReport> {
    return this.#model.export(path, { ...refuseAdapter("export", options), adapter: this.adapters });
  }

  toString(): string {
    return `MergeRequest(${this.#model.id} + ${this.adapters.map((a) => basename(a)).join(" + ")})`;
  }
}

Object.defineProperty(MergeRequest.prototype, inspect.custom, {
  value(this: MergeRequest): string {
    return this.toString();
  },
});

function refuseAdapter<T extends object>(kind: string, options: T): T {
  if (options === null || typeof options !== "object" || Array.isArray(options)) {
    throw new TypeError(`merge(...).${kind}(path, options) expects an options object, got ${JSON.stringify(options)}`);
  }
  if ("adapter" in options) {
    throw new TypeError(`merge(...).${kind}(path, options) takes the adapters from merge(); leave adapter out of the options`);
  }
  return options;
}
