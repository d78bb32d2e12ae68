// Public shapes of the API, in the ecosystem's camelCase. The wire types (snake_case) stay in
// bridge/protocol.gen.ts; these are what a notebook sees.

export type Dtype = "auto" | "bf16" | "fp16" | "fp32";
export const DTYPES: readonly Dtype[] = ["auto", "bf16", "fp16", "fp32"];

export type AttentionImplementation = "sdpa" | "eager";

export interface LoadOptions {
  /** Weight dtype; "auto" keeps what the checkpoint says (bf16 for Qwen2.5). */
  dtype?: Dtype;
  /** "auto", "cpu", "cuda" or "cuda:N". */
  device?: string;
  /** Hub branch, tag or commit. */
  revision?: string;
  attention?: AttentionImplementation;
  /** Never go to the network; use only what is in the local cache. */
  localFilesOnly?: boolean;
  /** Print no progress lines. */
  quiet?: boolean;
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
  device: string;
  contextLength: number;
  vocabSize: number;
  hasChatTemplate: boolean;
  loadSeconds?: number;
}

export interface ChatMessage {
  role: "system" | "user" | "assistant";
  content: string;
}

/** Why a generation ended. */
export type FinishReason = "stop" | "length" | "stop_string" | "cancelled";

export interface DeviceMemory {
  device: string;
  kind: "cuda" | "cpu";
  name?: string;
  /** Bytes allocated by tensors (cuda) or the worker's resident memory (cpu). */
  used: number;
  reserved?: number;
  peak?: number;
  total: number;
}

export interface RunningRequest {
  msgId: string;
  type: string;
  session: string;
  started: string;
}

export interface WorkerStatus {
  pid: number;
  uptimeSeconds: number;
  models: ModelInfo[];
  running: RunningRequest[];
  memory: DeviceMemory[];
  /** Where the worker writes its log. */
  log: string;
  runtimeFile: string;
}
