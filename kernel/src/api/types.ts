// Public shapes of the API, in the ecosystem's camelCase. The wire types (snake_case) stay in
// bridge/protocol.gen.ts; these are what a notebook sees.

import type {
  DeviceMemory as WireDeviceMemory,
  MalformedToolCall as WireMalformedToolCall,
  ToolCall as WireToolCall,
  ToolSpec as WireToolSpec,
} from "../bridge/protocol.gen";
import type { Devices } from "./devices";

export type Dtype = "auto" | "bf16" | "fp16" | "fp32";
export const DTYPES: readonly Dtype[] = ["auto", "bf16", "fp16", "fp32"];

export type AttentionImplementation = "sdpa" | "eager";

export interface LoadOptions {
  /** Weight dtype; "auto" keeps what the checkpoint says (bf16 for Qwen2.5). */
  dtype?: Dtype;
  /** "auto", "cpu", "cuda" or "cuda:N". */
  device?: string;
  /**
   * Spread the layers over several devices instead of one: "auto" (every visible GPU), a list such as
   * ["cuda:0", "cuda:1"], or { maxMemory: { "cuda:0": "20GiB", cpu: "64GiB" } }.
   */
  devices?: Devices;
  /** Hub branch, tag or commit. */
  revision?: string;
  attention?: AttentionImplementation;
  /** Never go to the network; use only what is in the local cache. */
  localFilesOnly?: boolean;
  /** Print no progress lines. */
  quiet?: boolean;
  /**
   * Weight-only quantization while loading: "int8" (per channel), "int4" (groups), "nf4" (needs
   * bitsandbytes in the worker). A folder saved quantized reloads quantized without it.
   */
  quant?: LoadQuant;
  /** int4: input columns sharing one scale (32, 64 or 128; default 128). */
  groupSize?: GroupSize;
  /** int4: a .txt/.json/.jsonl file of texts for GPTQ rounding instead of rounding to nearest. */
  calibration?: string;
}

export type LoadQuant = "int8" | "int4" | "nf4";
export type GroupSize = 32 | 64 | 128;
export const GROUP_SIZES: readonly GroupSize[] = [32, 64, 128];

/** How far a quantized form is from the unquantized model, measured on a held-out text. */
export interface QualityFigures {
  /** Predicted tokens the figures are averaged over. */
  tokens: number;
  perplexity: number;
  /** The unquantized model's perplexity on the same text. */
  referencePerplexity?: number;
  /** Mean per-token KL(unquantized || quantized), in nats. */
  meanKl?: number;
  /** Share (0..1) of positions where both pick the same top token. */
  top1Agreement?: number;
  /** What the figures were measured on. */
  text: string;
}

/** How a loaded model holds its quantized weights. */
export interface QuantInfo {
  method: LoadQuant;
  groupSize?: number;
  /** "nearest", "gptq", or how a saved folder was rounded. */
  rounding: string;
  /** Linear layers held quantized. */
  layers: number;
  /** Bytes of their codes and scales, and what the same layers take in bf16. */
  quantizedBytes: number;
  bf16Bytes: number;
  /** Loaded from a folder saved quantized, rather than quantized while loading. */
  fromFolder: boolean;
  /** Measured while quantizing at load; absent for a folder saved quantized. */
  quality?: QualityFigures;
}

export interface ModelInfo {
  /** Handle the worker knows the model by. */
  id: string;
  /** What was asked for: a hub id or a folder. */
  source: string;
  /** Local folder the weights came from. */
  path: string;
  architecture: string;
  parameters: number;
  dtype: string;
  /** Where token ids go: the device of the embeddings. */
  device: string;
  /** Every device holding part of the weights (several when loaded with `devices`). */
  devices: string[];
  contextLength: number;
  vocabSize: number;
  hasChatTemplate: boolean;
  loadSeconds?: number;
  /** Present when the weights are held quantized. */
  quant?: QuantInfo;
}

/**
 * One message of a chat. An assistant turn that called tools carries its `toolCalls`; a `tool` message is
 * a tool's result, answering the call `toolCallId` (both optional: Qwen's templates go by order).
 */
export interface ChatMessage {
  role: "system" | "user" | "assistant" | "tool";
  content: string;
  toolCalls?: ToolCall[];
  toolCallId?: string;
  name?: string;
}

/** A tool the model may call: its name, what it does, and its arguments as a JSON Schema object. */
export type ToolSpec = WireToolSpec;

/** A call the model made: the tool's name and its parsed JSON arguments. */
export type ToolCall = WireToolCall;

/** A `<tool_call>` block the model wrote that is not a call (bad JSON, no name); its text stays in the reply. */
export type MalformedToolCall = WireMalformedToolCall;

/** Why a generation ended: `tool_calls` when the model stopped after calling tools. */
export type FinishReason = "stop" | "tool_calls" | "length" | "stop_string" | "cancelled";

/** A device's memory: bytes allocated by tensors (cuda) or the worker's resident memory (cpu). */
export type DeviceMemory = WireDeviceMemory;

export interface RunningRequest {
  msgId: string;
  type: string;
  session: string;
  started: string;
}

/**
 * A live paged engine's key/value cache: taken when the engine starts (often most of a GPU), so this
 * says whose memory it is and how full it is.
 */
export interface EngineCache {
  modelId: string;
  /** "chat": the engine notebook chats with the model decode on; "server": an OpenAI-compatible server's (`m.serve()`). */
  role: "chat" | "server";
  /** Where the cache lives, named as in `memory`: "cuda:0", or "cpu". */
  device: string;
  blocksTotal: number;
  /** Blocks held by running requests (cached prefixes nobody holds are free to reuse). */
  blocksUsed: number;
  /** Tokens per block. */
  blockSize: number;
  /** Memory the cache takes, in bytes. */
  cacheBytes: number;
  /** Share of the device the cache was sized with (vLLM's gpu_memory_utilization); null when it was given a fixed block count. */
  memoryUtilization: number | null;
  /** Of the prompt tokens looked up in the prefix cache, the share found there (0 to 1). */
  prefixHitRate: number;
  /** Requests decoding. */
  running: number;
  /** Requests queued behind a full batch. */
  waiting: number;
}

export interface WorkerStatus {
  pid: number;
  uptimeSeconds: number;
  models: ModelInfo[];
  running: RunningRequest[];
  memory: DeviceMemory[];
  /** The key/value cache of each live paged engine: chat engines first, then servers'. */
  engines: EngineCache[];
  /** What the worker can put models on: "cpu", then "cuda:0", "cuda:1", ... */
  devices: string[];
  /** Where the worker writes its log. */
  log: string;
  runtimeFile: string;
}
