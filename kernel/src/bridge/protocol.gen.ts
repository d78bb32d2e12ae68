// Types for the worker protocol, made from python-bridge/qwenbook_bridge/schema/protocol.json by
// kernel/scripts/gen-protocol.mjs. Edit the schema and run `npm run gen:protocol -w kernel`, not this file.

/** Protocol version this kernel speaks; the worker refuses a different major version at hello. */
export const PROTOCOL_VERSION = "1.0";

export interface Header {
  /** minLength 1; maxLength 128 */
  msg_id: string;
  /** minLength 1; maxLength 64 */
  msg_type: string;
  /** maxLength 128 */
  session: string;
  /** ISO 8601 time the message was made */
  date: string;
  /** pattern "^[0-9]+\\.[0-9]+$" */
  version: string;
}

export interface ErrorReply {
  status: "error";
  /** Python exception class, or a protocol error name */
  ename: string;
  /** Human-readable message saying what was wrong and how to fix it */
  evalue: string;
  traceback: Array<string>;
}

export interface ChatMessage {
  role: "system" | "user" | "assistant";
  content: string;
}

export interface ModelInfo {
  /** Handle used by later requests */
  model_id: string;
  /** What the client asked for: a hub id or a folder */
  source: string;
  /** Resolved local folder the weights came from */
  path: string;
  architecture: string;
  parameters: number;
  dtype: string;
  device: string;
  context_length: number;
  vocab_size: number;
  has_chat_template: boolean;
  load_seconds?: number;
}

export interface DeviceMemory {
  /** cuda:0, or cpu for process memory */
  device: string;
  kind: "cuda" | "cpu";
  name?: string;
  /** bytes: allocated by tensors (cuda) or process RSS (cpu) */
  used: number;
  /** bytes held by the caching allocator (cuda only) */
  reserved?: number;
  /** bytes, peak allocated since start or last reset */
  peak?: number;
  /** bytes on the device, or machine RAM for cpu */
  total: number;
}

export interface HelloRequest {
  protocol_version: string;
  client: string;
}

export interface HelloReply {
  status: "ok";
  protocol_version: string;
  worker_version: string;
  pid: number;
  python: string;
  torch: string;
  transformers: string;
  devices: Array<string>;
}

export interface LoadRequest {
  /**
   * hub id (Qwen/Qwen2.5-7B-Instruct) or local folder
   * minLength 1
   */
  model: string;
  /** @default "auto" */
  dtype?: "auto" | "bf16" | "fp16" | "fp32";
  /**
   * auto, cpu, cuda or cuda:N
   * @default "auto"
   */
  device?: string;
  revision?: string;
  /** @default "sdpa" */
  attn_implementation?: "sdpa" | "eager";
  /** @default false */
  local_files_only?: boolean;
}

export interface LoadProgressEvent {
  stage: "resolve" | "download" | "tokenizer" | "weights" | "ready";
  message: string;
  /** minimum 0; maximum 1 */
  fraction?: number;
  bytes_done?: number;
  bytes_total?: number;
}

export interface LoadReply {
  status: "ok";
  model: ModelInfo;
  already_loaded: boolean;
}

export interface UnloadRequest {
  model_id: string;
}

export interface UnloadReply {
  status: "ok";
  unloaded: boolean;
}

export interface GenerateRequest {
  model_id: string;
  /** minItems 1 */
  messages: Array<ChatMessage>;
  /**
   * minimum 1
   * @default 512
   */
  max_tokens?: number;
  /**
   * minimum 0
   * @default 0.7
   */
  temperature?: number;
  /**
   * maximum 1; exclusiveMinimum 0
   * @default 0.8
   */
  top_p?: number;
  /**
   * minimum 0
   * @default 20
   */
  top_k?: number;
  /** @default false */
  greedy?: boolean;
  /** maxItems 16 */
  stop?: Array<string>;
  seed?: number;
  /** @default true */
  stream?: boolean;
}

export interface TokenEvent {
  /** Text delta; never ends inside a multi-byte character */
  text: string;
  token_ids: Array<number>;
  /** Number of tokens generated before this delta */
  index: number;
}

export interface GenerateReply {
  status: "ok";
  text: string;
  token_ids?: Array<number>;
  finish_reason: "stop" | "length" | "stop_string" | "cancelled";
  prompt_tokens: number;
  completion_tokens: number;
  ttft_ms: number;
  duration_ms: number;
  tokens_per_s?: number;
}

export interface CancelRequest {
  /** msg_id of the request to stop */
  target: string;
}

export interface CancelReply {
  status: "ok";
  /** false when the target had already finished or was unknown */
  cancelled: boolean;
}

export type StatusRequest = Record<string, never>;

export interface StatusReply {
  status: "ok";
  pid: number;
  uptime_s: number;
  models: Array<ModelInfo>;
  running: Array<{
    msg_id: string;
    msg_type: string;
    session: string;
    started: string;
  }>;
  memory: Array<DeviceMemory>;
}

export type ShutdownRequest = Record<string, never>;

export interface ShutdownReply {
  status: "ok";
}

export interface GpuEvent {
  devices: Array<DeviceMemory>;
  /** Unix time in seconds */
  time: number;
}

export interface WorkerStatusEvent {
  state: "idle" | "busy" | "stopping";
  running: number;
}

/** Every request type: its content, its ok reply, and the events it may stream before the reply. */
export interface RequestMap {
  hello: { request: HelloRequest; reply: HelloReply; events: never };
  load: { request: LoadRequest; reply: LoadReply; events: "load_progress" };
  unload: { request: UnloadRequest; reply: UnloadReply; events: never };
  generate: { request: GenerateRequest; reply: GenerateReply; events: "token" };
  cancel: { request: CancelRequest; reply: CancelReply; events: never };
  status: { request: StatusRequest; reply: StatusReply; events: never };
  shutdown: { request: ShutdownRequest; reply: ShutdownReply; events: never };
}

/** Events streamed for a request, keyed by msg_type. */
export interface EventMap {
  token: TokenEvent;
  load_progress: LoadProgressEvent;
}

/** Worker-wide telemetry on the PUB socket, keyed by topic (msg_type). */
export interface BroadcastMap {
  gpu: GpuEvent;
  worker_status: WorkerStatusEvent;
}

export type RequestType = keyof RequestMap;
export type EventType = keyof EventMap;
export type BroadcastType = keyof BroadcastMap;

export const REQUEST_TYPES: readonly RequestType[] = ["hello", "load", "unload", "generate", "cancel", "status", "shutdown"];
export const EVENT_TYPES: readonly EventType[] = ["token", "load_progress"];
export const BROADCAST_TYPES: readonly BroadcastType[] = ["gpu", "worker_status"];
