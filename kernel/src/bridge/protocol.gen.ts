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
  role: "system" | "user" | "assistant" | "tool";
  content: string;
  /** The calls an assistant turn made */
  tool_calls?: Array<ToolCall>;
  /** On a tool message: the call it answers */
  tool_call_id?: string;
  /** On a tool message: the tool that answered */
  name?: string;
}

export interface ToolSpec {
  /** pattern "^[A-Za-z0-9_.-]{1,64}$" */
  name: string;
  description?: string;
  /** JSON Schema of the arguments object */
  parameters?: Record<string, unknown>;
}

export interface ToolCall {
  id?: string;
  name: string;
  /** The parsed JSON arguments */
  arguments: Record<string, unknown>;
}

export interface MalformedToolCall {
  /** The <tool_call> block as the model wrote it (also kept in the reply's text) */
  text: string;
  /** Why it is not a call */
  error: string;
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
  /** Every device holding part of the weights (cuda:0, cuda:1, cpu) */
  devices?: Array<string>;
  context_length: number;
  vocab_size: number;
  has_chat_template: boolean;
  load_seconds?: number;
  quant?: QuantInfo;
}

/** auto (every visible GPU), a list of devices, or per-device memory budgets */
export type DevicesOption = "auto" | Array<string> | {
  /** device (cuda:N or cpu) to bytes or a size like "20GiB" */
  maxMemory: Record<string, unknown>;
};

export interface DeviceMemory {
  /** cuda:0, or cpu for process memory */
  device: string;
  kind: "cuda" | "cpu";
  name?: string;
  /**
   * bytes: allocated by tensors (cuda) or process RSS (cpu)
   * minimum 0
   */
  used: number;
  /**
   * bytes held by the caching allocator (cuda only)
   * minimum 0
   */
  reserved?: number;
  /**
   * bytes, peak allocated since start or last reset
   * minimum 0
   */
  peak?: number;
  /**
   * bytes on the device, or machine RAM for cpu
   * minimum 0
   */
  total: number;
}

/** A live paged engine's key/value cache, sized when the engine started: a model's notebook chat engine or an OpenAI-compatible server's engine. */
export interface EngineCache {
  model_id: string;
  /** chat: the engine notebook chats with the model decode on; server: an HTTP server's */
  role: "chat" | "server";
  /** Where the cache lives, named as DeviceMemory.device: cuda:0, or cpu */
  device: string;
  /** minimum 0 */
  blocks_total: number;
  /**
   * Blocks held by running requests (cached prefixes nobody holds are free to reuse)
   * minimum 0
   */
  blocks_used: number;
  /**
   * Tokens per block
   * minimum 1
   */
  block_size: number;
  /**
   * Memory the cache takes
   * minimum 0
   */
  cache_bytes: number;
  /**
   * Share of the device the cache was sized with (vLLM's gpu_memory_utilization); absent when the engine was given a fixed block count
   * maximum 1; exclusiveMinimum 0
   */
  memory_utilization?: number;
  /**
   * Of the prompt tokens looked up in the prefix cache, the share found there
   * minimum 0; maximum 1
   */
  prefix_hit_rate: number;
  /**
   * Requests decoding
   * minimum 0
   */
  running: number;
  /**
   * Requests queued behind a full batch
   * minimum 0
   */
  waiting: number;
}

export interface HelloRequest {
  protocol_version: string;
  client: string;
  /**
   * The client's process id: models this session loaded stop counting it as a user once that process is gone (a crashed kernel)
   * minimum 1
   */
  pid?: number;
  /** The client's host name; pid is checked only when it is the worker's own host */
  host?: string;
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
  /** Spread the model over several devices (instead of device) */
  devices?: DevicesOption;
  revision?: string;
  /** @default "sdpa" */
  attn_implementation?: "sdpa" | "eager";
  /** @default false */
  local_files_only?: boolean;
  /** Weight-only quantization applied while loading; a folder saved quantized reloads without it */
  quant?: QuantOptions;
}

export interface LoadProgressEvent {
  stage: "resolve" | "download" | "tokenizer" | "weights" | "quantize" | "cpu_chat" | "ready";
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
  /**
   * Free the model even while other sessions that loaded it are still running
   * @default false
   */
  force?: boolean;
}

export interface UnloadReply {
  status: "ok";
  /** The model was freed; false when it was not loaded, or when other sessions still use it */
  unloaded: boolean;
  /**
   * Other live sessions that loaded the model: without force it stays loaded for them and only this session's use is dropped; with force they lose it
   * minimum 0
   */
  other_users?: number;
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
  /**
   * Drop tokens less likely than min_p times the most likely one (after temperature); 0 turns it off
   * minimum 0; maximum 1
   * @default 0
   */
  min_p?: number;
  /** @default false */
  greedy?: boolean;
  /** maxItems 16 */
  stop?: Array<string>;
  seed?: number;
  /** @default true */
  stream?: boolean;
  /**
   * Name of a LoRA adapter loaded on this model (adapter_load) to answer with; absent: the base model
   * minLength 1
   */
  adapter?: string;
  /**
   * Tools the template shows the model; its calls come back parsed
   * maxItems 128
   */
  tools?: Array<ToolSpec>;
  /** The template's enable_thinking (Qwen3); absent: the template's default */
  thinking?: boolean;
}

export interface TokenEvent {
  /** Answer text delta; never ends inside a multi-byte character */
  text: string;
  /** Reasoning text delta (inside the model's <think> block) */
  reasoning?: string;
  /** Tool calls completed in this delta */
  tool_calls?: Array<ToolCall>;
  token_ids: Array<number>;
  /** Number of tokens generated before this delta */
  index: number;
}

export interface GenerateReply {
  status: "ok";
  /** The answer, without reasoning and tool calls */
  text: string;
  token_ids?: Array<number>;
  finish_reason: "stop" | "tool_calls" | "length" | "stop_string" | "cancelled";
  prompt_tokens: number;
  completion_tokens: number;
  ttft_ms: number;
  duration_ms: number;
  tokens_per_s?: number;
  reasoning?: string;
  reasoning_tokens?: number;
  reasoning_ms?: number;
  tool_calls?: Array<ToolCall>;
  tool_call_errors?: Array<MalformedToolCall>;
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
  /** What this worker can put models on: cpu, then cuda:0, cuda:1, ... */
  devices: Array<string>;
  models: Array<ModelInfo>;
  running: Array<{
    msg_id: string;
    msg_type: string;
    session: string;
    started: string;
  }>;
  memory: Array<DeviceMemory>;
  /** The key/value cache of each live paged engine: chat engines first, then servers'. Absent from a worker older than this field (one that outlived an upgrade) */
  engines?: Array<EngineCache>;
}

export type ShutdownRequest = Record<string, never>;

export interface ShutdownReply {
  status: "ok";
}

export interface QuantOptions {
  /** int8 per output channel, int4 in groups, nf4 through bitsandbytes (when installed) */
  method: "int8" | "int4" | "nf4";
  /**
   * int4 only: input columns sharing one scale
   * @default 128
   */
  group_size?: 32 | 64 | 128;
  /**
   * int4 only: absolute path of a .txt/.json/.jsonl file of texts for GPTQ rounding
   * minLength 1
   */
  calibration?: string;
}

export interface QualityInfo {
  /** Predicted tokens the figures are averaged over */
  tokens: number;
  perplexity: number;
  /** The unquantized model's perplexity on the same text */
  reference_perplexity?: number;
  /** Mean per-token KL(unquantized || this), in nats */
  mean_kl?: number;
  /**
   * Share of positions where both pick the same top token
   * minimum 0; maximum 1
   */
  top1_agreement?: number;
  /** What the figures were measured on */
  text: string;
}

export interface QuantInfo {
  method: "int8" | "int4" | "nf4";
  /** int4: the group size asked for (a layer whose input it does not divide uses a smaller one) */
  group_size?: number;
  /** nearest, gptq, or as saved */
  rounding: string;
  /** Linear layers held quantized */
  layers: number;
  /** Bytes of codes and scales of the quantized layers */
  quantized_bytes: number;
  /** Bytes the same layers take in bf16 */
  bf16_bytes: number;
  /** Loaded from a folder saved quantized (true) or quantized while loading (false) */
  from_folder: boolean;
  quality?: QualityInfo;
}

export interface SaveRequest {
  model_id: string;
  /**
   * Absolute path of the folder to write
   * minLength 1
   */
  target: string;
  /**
   * Absolute paths of peft adapter folders to merge into the base while saving
   * minItems 1
   */
  adapters?: Array<string>;
  /**
   * Largest safetensors file, e.g. 2GB, 500MB, 1.5GiB or a byte count
   * pattern "^\\s*\\d+(\\.\\d+)?\\s*([kKmMgGtT][iI]?[bB]|[bB])?\\s*$"
   * @default "2GB"
   */
  shard_size?: string;
  /** Cast floating-point weights on the way out; absent keeps each tensor's dtype */
  dtype?: "bf16" | "fp16" | "fp32";
  /**
   * Replace a target folder that exists and is not empty
   * @default false
   */
  overwrite?: boolean;
  /** Save int8/int4 weights (a model loaded quantized is saved quantized without this) */
  quant?: QuantOptions;
}

export interface ExportRequest {
  model_id: string;
  /**
   * Absolute path of the file to write
   * minLength 1
   */
  target: string;
  format: "gguf";
  /**
   * Tensor type of the 2-D weights, or a llama.cpp K-quant mix (per-tensor types as llama-quantize picks them)
   * @default "f16"
   */
  type?: "f32" | "f16" | "bf16" | "q8_0" | "q4_0" | "q4_k_m" | "q5_k_m" | "q6_k";
  /**
   * Also write an Ollama Modelfile beside the GGUF file
   * @default true
   */
  modelfile?: boolean;
  /**
   * Absolute paths of peft adapter folders to merge in
   * minItems 1
   */
  adapters?: Array<string>;
  /** @default false */
  overwrite?: boolean;
}

export interface ExportProgressEvent {
  stage: "prepare" | "quantize" | "calibrate" | "write" | "tokenizer" | "evaluate" | "done";
  /**
   * Of the whole operation; never goes backwards
   * minimum 0; maximum 1
   */
  fraction: number;
  bytes_done: number;
  bytes_total: number;
}

export interface FileSize {
  /** Relative to the saved folder, or the file's name */
  path: string;
  bytes: number;
}

/** What the writer did; which fields appear depends on the format */
export interface ExportDetails {
  shards?: number;
  tensors?: number;
  merged?: boolean;
  adapters?: Array<string>;
  /** Quantized linear layers */
  layers?: number;
  rounding?: string;
  /** Unquantized folder the weights were quantized again from */
  requantized_from?: string;
  /** Weights held int8/int4 were written as floating point (GGUF export of a quantized model) */
  dequantized?: boolean;
  kept_f16?: Array<string>;
  types?: Array<string>;
  /** GGUF K-quant mix: how many tensors of each type */
  tensor_types?: Record<string, number>;
  /** GGUF K-quant mix: the tensors given another type than the mix's main one, with the type and why */
  other_types?: Record<string, string>;
  modelfile?: ModelfileInfo;
}

/** The Ollama Modelfile written beside a GGUF file */
export interface ModelfileInfo {
  /** Its file name, beside the GGUF file */
  path: string;
  /** The chat format of its TEMPLATE (qwen2.5, qwen3), null without one */
  template?: string | null;
  stop: Array<string>;
  /** Sampling defaults from generation_config.json */
  parameters: Record<string, number>;
  note?: string;
}

export interface ExportReply {
  status: "ok";
  path: string;
  /** safetensors, safetensors-int8, safetensors-int4, gguf-<type> */
  format: string;
  sizes: {
    root: string;
    files: Array<FileSize>;
    total_bytes: number;
  };
  /** Absent when not measured (plain and merged saves) */
  quality?: QualityInfo;
  details: ExportDetails;
}

/** Serve a loaded model as an OpenAI-compatible HTTP API (GET /v1/models, POST /v1/chat/completions, POST /v1/completions) from inside the worker, sharing its weights. One server per model; asking again with the same options returns the running one. */
export interface ServeStartRequest {
  /** minLength 1 */
  model_id: string;
  /**
   * 0 picks a free port (the reply says which)
   * minimum 0; maximum 65535
   * @default 8000
   */
  port?: number;
  /**
   * Address to bind: 127.0.0.1 is this machine only, 0.0.0.0 every interface
   * minLength 1
   * @default "127.0.0.1"
   */
  host?: string;
  /**
   * When set, every HTTP request needs 'Authorization: Bearer <api_key>'
   * minLength 1
   */
  api_key?: string;
  /**
   * The id clients pass as `model` and /v1/models lists; default: the model's hub id or folder name
   * minLength 1
   */
  name?: string;
  /**
   * Requests decoded together; more wait in a queue
   * minimum 1; maximum 1024
   * @default 32
   */
  max_batch_size?: number;
  /**
   * Requests that may wait for a place in the batch; one more is answered 429 with Retry-After. Default: 4 per batch row
   * minimum 0; maximum 1000000
   */
  max_queue?: number;
  /**
   * Larger request bodies are answered 413 while they arrive
   * minimum 1024; maximum 1073741824
   * @default 4194304
   */
  max_body_bytes?: number;
  /**
   * Retry-After of a 429, in seconds; default: estimated from how long recent requests took
   * minimum 1; maximum 3600
   */
  retry_after_s?: number;
  /**
   * Seconds a client may take to send its headers or body (408), or leave a stream unread, before it is disconnected
   * minimum 0.1; maximum 3600
   * @default 30
   */
  client_timeout_s?: number;
  /** LoRA adapters served beside the base model, name -> absolute peft adapter folder: a request whose `model` is the name decodes through that adapter (vLLM's --lora-modules). Names must differ from `name` */
  adapters?: Record<string, string>;
  /**
   * Share of the device's memory the model and its key/value cache may use (vLLM's gpu_memory_utilization; on the CPU, of the free RAM)
   * maximum 1; exclusiveMinimum 0
   * @default 0.9
   */
  memory_utilization?: number;
}

export interface ServeStats {
  running: boolean;
  /** Base URL for OpenAI clients, e.g. http://127.0.0.1:8000/v1 */
  url: string;
  host: string;
  port: number;
  model_name: string;
  requests_total: number;
  requests_active: number;
  /** Queued behind a full batch */
  requests_waiting: number;
  /** Turned away with 429 because the queue was full */
  requests_rejected?: number;
  /** Requests answered with an error status */
  errors: number;
  tokens_generated: number;
  /** Averaged over the last few seconds */
  tokens_per_second: number;
  /** '<HTTP status>: <message>' of the latest error; absent when there was none */
  last_error?: string;
  /** Unix time of last_error */
  last_error_at?: number;
  /** Unix time; absent once stopped */
  started_at?: number;
  uptime_s: number;
  /** Names of the LoRA adapters served beside the base model */
  adapters?: Array<string>;
  /** Share of the device's memory the model and its cache may use; absent for an engine without a block cache */
  memory_utilization?: number;
  /** Key/value cache blocks (absent for an engine without a block cache, as are the fields below) */
  blocks_total?: number;
  /** Cache blocks held by running requests */
  blocks_used?: number;
  /** Tokens per cache block */
  block_size?: number;
  /** Memory the key/value cache takes */
  cache_bytes?: number;
  /** Of the prompt tokens looked up in the prefix cache, the share found there (0 to 1) */
  prefix_hit_rate?: number;
}

export interface ServerInfo {
  server_id: string;
  /** The loaded model it serves */
  model_id: string;
  /** The id clients pass as `model` */
  name: string;
  url: string;
  host: string;
  /** The bound port (the chosen one when 0 was asked for) */
  port: number;
  /** Whether an API key is required */
  auth: boolean;
  max_batch_size: number;
  /** Requests that may wait for a place in the batch */
  max_queue?: number;
  max_body_bytes?: number;
  client_timeout_s?: number;
  /** LoRA adapters served beside the base model: name (a `model` clients may ask for) -> folder */
  adapters?: Record<string, string>;
  /** A curl command that sends one chat request to this server */
  curl_example: string;
  stats: ServeStats;
}

export interface ServeStartReply {
  status: "ok";
  server: ServerInfo;
  /** The model was already served with these options; that server is returned */
  already_running: boolean;
}

/** Stop one server (server_id) or the server of a model (model_id); exactly one of the two. The port is freed, the model stays loaded. */
export interface ServeStopRequest {
  /** minLength 1 */
  server_id?: string;
  /** minLength 1 */
  model_id?: string;
}

export interface ServeStopReply {
  status: "ok";
  /** Final state of each server stopped; empty when none matched (already stopped) */
  stopped: Array<ServerInfo>;
}

/** Running servers and their live counters; server_id or model_id narrow the list. */
export interface ServeStatusRequest {
  /** minLength 1 */
  server_id?: string;
  /** minLength 1 */
  model_id?: string;
}

export interface ServeStatusReply {
  status: "ok";
  servers: Array<ServerInfo>;
}

export interface LoraOptions {
  /**
   * Rank of the update matrices
   * minimum 1
   * @default 8
   */
  r?: number;
  /**
   * Scale numerator (the update is scaled by alpha / r); absent: 2 * r
   * exclusiveMinimum 0
   */
  alpha?: number;
  /**
   * Dropout on the LoRA input
   * minimum 0; exclusiveMaximum 1
   * @default 0
   */
  dropout?: number;
  /**
   * Module names to adapt (q_proj, v_proj, ...), or every linear layer but the output head
   * @default "all-linear"
   */
  targets?: "all-linear" | Array<string>;
}

/** A fine-tuning run's options, as engine/train/config.py TrainConfig names them; the engine checks every value again and lists all that cannot work */
export interface TrainOptions {
  /**
   * Absolute path of the run folder (checkpoint-<step>/ and the final adapter or weights)
   * minLength 1
   */
  output_dir: string;
  /** @default "lora" */
  method?: "lora" | "full";
  lora?: LoraOptions;
  /**
   * minimum 2
   * @default 1024
   */
  max_length?: number;
  /**
   * What happens to rows longer than max_length (counted and reported either way)
   * @default "truncate"
   */
  truncation?: "truncate" | "drop";
  /**
   * minimum 1
   * @default 4
   */
  batch_size?: number;
  /**
   * minimum 1
   * @default 4
   */
  grad_accum?: number;
  /**
   * May be fractional; ignored when max_steps is set
   * exclusiveMinimum 0
   * @default 3
   */
  epochs?: number;
  /** minimum 1 */
  max_steps?: number;
  /**
   * exclusiveMinimum 0
   * @default 0.0001
   */
  lr?: number;
  /** @default "cosine" */
  schedule?: "cosine" | "linear" | "constant";
  /**
   * Below 1: a fraction of all steps; 1 or more: a number of steps
   * minimum 0
   * @default 0
   */
  warmup?: number;
  /** @default "adamw" */
  optimizer?: "adamw";
  /**
   * minimum 0
   * @default 0
   */
  weight_decay?: number;
  /**
   * minItems 2; maxItems 2
   * @default [0.9,0.999]
   */
  adam_betas?: Array<number>;
  /**
   * exclusiveMinimum 0
   * @default 1e-8
   */
  adam_eps?: number;
  /**
   * Gradient clipping; 0 turns it off
   * minimum 0
   * @default 1
   */
  max_grad_norm?: number;
  /**
   * Compute precision
   * @default "auto"
   */
  dtype?: "auto" | "bf16" | "fp16" | "fp32";
  /** @default false */
  gradient_checkpointing?: boolean;
  /**
   * With gradient checkpointing in a compiled LoRA run: GiB of extra activations the layers may keep so backward recomputes less (selective checkpointing). Absent: a quarter of the GPU's free memory once the model is loaded; 0: recompute whole layers
   * minimum 0
   */
  activation_memory_gb?: number;
  /** @default false */
  packing?: boolean;
  /**
   * torch.compile each decoder layer: faster GPU steps after a compile of a minute or so at the start; each new batch shape compiles again, so pair it with packing. On a CPU it rarely pays
   * @default false
   */
  compile?: boolean;
  /**
   * minimum 0; exclusiveMaximum 1
   * @default 0
   */
  eval_split?: number;
  /**
   * 0: only at the end
   * minimum 0
   * @default 0
   */
  eval_every?: number;
  /**
   * 0: only at the end (and on cancel)
   * minimum 0
   * @default 0
   */
  save_every?: number;
  /**
   * minimum 1
   * @default 1
   */
  log_every?: number;
  /** @default 42 */
  seed?: number;
  /**
   * Absolute path of a checkpoint-<step> folder, or of a run folder (its newest checkpoint)
   * minLength 1
   */
  resume_from?: string;
  /**
   * Start afresh in an output_dir that holds another run's checkpoints (they are deleted)
   * @default false
   */
  overwrite?: boolean;
  /**
   * Where else the dashboard's series go: TensorBoard event files in <output_dir>/runs/<date>_<host>, an offline wandb run in <output_dir>/wandb (needs the wandb package)
   * @default []
   */
  report?: Array<ReportTarget>;
  preference?: PreferenceOptions;
  /**
   * LoRA: absolute path of a peft adapter folder to continue (an SFT run's) instead of a fresh adapter; its r, alpha and targets are the run's, and for DPO it is the reference
   * minLength 1
   */
  init_adapter?: string;
}

/** Preference tuning on {prompt | messages, chosen, rejected} rows instead of supervised answers */
export interface PreferenceOptions {
  /**
   * dpo: against a reference model; orpo: NLL on the chosen answer plus an odds-ratio term; simpo: length-normalised, no reference
   * @default "dpo"
   */
  method?: "dpo" | "orpo" | "simpo";
  /**
   * DPO: the pull toward the reference; ORPO: the odds-ratio term's weight (lambda); SimPO: the reward scale. Absent: 0.1 (DPO, ORPO), 2.0 (SimPO)
   * exclusiveMinimum 0
   */
  beta?: number;
  /**
   * DPO: assumed fraction of flipped labels (conservative DPO)
   * minimum 0; exclusiveMaximum 0.5
   * @default 0
   */
  label_smoothing?: number;
  /**
   * SimPO: the target reward margin
   * @default 0.5
   */
  gamma?: number;
}

export type ReportTarget = "tensorboard" | "wandb";

/** Where each report target of a run wrote */
export interface ReportLocations {
  /** The folder of the event files (tensorboard --logdir it) */
  tensorboard?: string;
  /** The offline run folder (wandb sync uploads it) */
  wandb?: string;
}

export interface SelfCognitionOptions {
  /** minLength 1 */
  name: string;
  /** minLength 1 */
  author: string;
  /**
   * Name in the English answers; absent: name
   * minLength 1
   */
  name_en?: string;
  /**
   * Author in the English answers; absent: author
   * minLength 1
   */
  author_en?: string;
  /**
   * Halves of the built-in set to use; absent: both
   * minItems 1
   */
  languages?: Array<"zh" | "en">;
}

/** One source of training rows: exactly one of path, rows and self_cognition */
export interface DatasetSource {
  /**
   * Absolute path of a .json (list of rows) or .jsonl file
   * minLength 1
   */
  path?: string;
  /**
   * alpaca or sharegpt rows sent inline
   * minItems 1
   */
  rows?: Array<Record<string, unknown>>;
  self_cognition?: SelfCognitionOptions;
  /** @default "auto" */
  format?: "auto" | "alpaca" | "sharegpt";
  /**
   * Rows drawn from this source (seeded); more than it holds cycles through it
   * minimum 1
   */
  samples?: number;
  /**
   * Label in reports and error messages
   * minLength 1
   */
  name?: string;
}

export interface TrainRequest {
  model_id: string;
  config: TrainOptions;
  /** minItems 1 */
  datasets: Array<DatasetSource>;
  distributed?: DistributedOptions;
}

/** Train on several ranks: processes on this host (devices) or Ray Train workers (cluster). The global batch is batch_size x grad_accum rows, as on one device; grad_accum must split evenly over the ranks */
export interface DistributedOptions {
  /**
   * ddp: a whole model per rank (LoRA); fsdp: FSDP2, weights, gradients and optimizer state sharded over the ranks
   * @default "ddp"
   */
  strategy?: "ddp" | "fsdp";
  /**
   * Ranks on this host under torchrun: one GPU each, or CPU processes (gloo) on a CPU-only worker
   * minimum 1
   */
  devices?: number;
  cluster?: ClusterOptions;
}

export interface ClusterOptions {
  /**
   * ray://host:10001 or host:6379; default RAY_ADDRESS
   * minLength 1
   */
  address?: string;
  /** minimum 1 */
  workers: number;
  /** minimum 0 */
  gpus_per_worker?: number;
  /** exclusiveMinimum 0 */
  connect_timeout_s?: number;
}

export interface RankMemory {
  rank: number;
  device: string;
  /** The GPU's name, or the process's memory on a CPU */
  name: string;
  /** The GPU's memory, or the machine's RAM */
  total: number;
  /** Bytes the rank's tensors hold */
  used: number;
  /** Most bytes held since the run started */
  peak: number;
}

export interface SourceStats {
  name: string;
  format: string;
  /** Rows the source holds */
  rows: number;
  /** Rows drawn from it */
  samples: number;
}

export interface DatasetStats {
  sources: Array<SourceStats>;
  /** Examples kept for training and eval */
  examples: number;
  /** Rows longer than max_length */
  too_long: number;
  truncated: number;
  dropped_too_long: number;
  /** Rows with no answer token left after truncation */
  dropped_no_answer: number;
  retokenized_boundaries?: number;
  tokens: number;
  /** Tokens the loss is computed on (the answers) */
  trained_tokens: number;
  max_length: number;
  notes: Array<string>;
}

export interface TrainBeginEvent {
  total_steps: number;
  steps_per_epoch: number;
  /** 0, or the step a resumed run continues from */
  start_step: number;
  /** The checkpoint a resumed run continues from */
  resumed_from?: string;
  examples: number;
  eval_examples: number;
  rows_per_step: number;
  trainable_params: number;
  total_params: number;
  device: string;
  dataset: DatasetStats;
  notes: Array<string>;
  /** Every option of the run, defaults filled in */
  config: Record<string, unknown>;
  /** Ranks in a several-process run (absent on one device) */
  world_size?: number;
  /** How a several-process run splits the work */
  strategy?: "ddp" | "fsdp";
}

export interface TrainProgressEvent {
  /** Optimizer steps done */
  step: number;
  total_steps: number;
  epoch: number;
  /** Mean token loss over the steps since the last event */
  loss: number;
  /** Learning rate of the step just taken */
  lr: number;
  /** Before clipping */
  grad_norm: number;
  /** Training throughput since the last event */
  tokens_per_s: number;
  eta_s: number;
  /** Every rank's device memory, in a several-process run */
  rank_memory?: Array<RankMemory>;
  /** Bytes of RAM the training process holds (resident set) */
  cpu_memory?: number;
  /** Bytes PyTorch's allocator holds on the training GPU (absent on the CPU) */
  gpu_memory?: number;
  /** Preference: mean reward of the chosen answers (beta x log-ratio to the reference for DPO, beta x mean token log-prob for ORPO and SimPO) */
  "rewards/chosen"?: number;
  /** Preference: mean reward of the rejected answers */
  "rewards/rejected"?: number;
  /** Preference: mean of chosen minus rejected reward */
  "rewards/margins"?: number;
  /** Preference: fraction of pairs whose chosen reward is above the rejected one */
  "rewards/accuracies"?: number;
  /** Preference: mean log-probability of the chosen answers (summed over tokens for DPO, per token otherwise) */
  "logps/chosen"?: number;
  /** Preference: mean log-probability of the rejected answers */
  "logps/rejected"?: number;
  /** ORPO: the chosen answers' mean token loss */
  nll_loss?: number;
  /** ORPO: mean log sigmoid of the log odds ratio (the term weighted by beta) */
  log_odds_ratio?: number;
  /** ORPO: mean log odds ratio of chosen over rejected */
  log_odds_chosen?: number;
}

export interface EvalEvent {
  step: number;
  eval_loss: number;
  best_eval_loss: number;
  eval_tokens: number;
  /** Rows evaluated */
  eval_examples?: number;
  eval_runtime_s?: number;
  /** Preference: mean reward of the chosen answers (beta x log-ratio to the reference for DPO, beta x mean token log-prob for ORPO and SimPO) */
  "eval_rewards/chosen"?: number;
  /** Preference: mean reward of the rejected answers */
  "eval_rewards/rejected"?: number;
  /** Preference: mean of chosen minus rejected reward */
  "eval_rewards/margins"?: number;
  /** Preference: fraction of pairs whose chosen reward is above the rejected one */
  "eval_rewards/accuracies"?: number;
  /** Preference: mean log-probability of the chosen answers (summed over tokens for DPO, per token otherwise) */
  "eval_logps/chosen"?: number;
  /** Preference: mean log-probability of the rejected answers */
  "eval_logps/rejected"?: number;
  /** ORPO: the chosen answers' mean token loss */
  eval_nll_loss?: number;
  /** ORPO: mean log sigmoid of the log odds ratio (the term weighted by beta) */
  eval_log_odds_ratio?: number;
  /** ORPO: mean log odds ratio of chosen over rejected */
  eval_log_odds_chosen?: number;
}

export interface CheckpointEvent {
  step: number;
  /** The complete checkpoint-<step> folder */
  path: string;
  reason: "periodic" | "final" | "cancel";
}

/** A train_progress or eval event as the run recorded it */
export interface TrainHistoryEntry {
  kind: "train_progress" | "eval";
  step: number;
  total_steps?: number;
  epoch?: number;
  loss?: number;
  lr?: number;
  grad_norm?: number;
  tokens_per_s?: number;
  eta_s?: number;
  cpu_memory?: number;
  gpu_memory?: number;
  eval_loss?: number;
  best_eval_loss?: number;
  eval_tokens?: number;
  eval_examples?: number;
  eval_runtime_s?: number;
  /** Preference: mean reward of the chosen answers (beta x log-ratio to the reference for DPO, beta x mean token log-prob for ORPO and SimPO) */
  "rewards/chosen"?: number;
  /** Preference: mean reward of the rejected answers */
  "rewards/rejected"?: number;
  /** Preference: mean of chosen minus rejected reward */
  "rewards/margins"?: number;
  /** Preference: fraction of pairs whose chosen reward is above the rejected one */
  "rewards/accuracies"?: number;
  /** Preference: mean log-probability of the chosen answers (summed over tokens for DPO, per token otherwise) */
  "logps/chosen"?: number;
  /** Preference: mean log-probability of the rejected answers */
  "logps/rejected"?: number;
  /** ORPO: the chosen answers' mean token loss */
  nll_loss?: number;
  /** ORPO: mean log sigmoid of the log odds ratio (the term weighted by beta) */
  log_odds_ratio?: number;
  /** ORPO: mean log odds ratio of chosen over rejected */
  log_odds_chosen?: number;
  /** Preference: mean reward of the chosen answers (beta x log-ratio to the reference for DPO, beta x mean token log-prob for ORPO and SimPO) */
  "eval_rewards/chosen"?: number;
  /** Preference: mean reward of the rejected answers */
  "eval_rewards/rejected"?: number;
  /** Preference: mean of chosen minus rejected reward */
  "eval_rewards/margins"?: number;
  /** Preference: fraction of pairs whose chosen reward is above the rejected one */
  "eval_rewards/accuracies"?: number;
  /** Preference: mean log-probability of the chosen answers (summed over tokens for DPO, per token otherwise) */
  "eval_logps/chosen"?: number;
  /** Preference: mean log-probability of the rejected answers */
  "eval_logps/rejected"?: number;
  /** ORPO: the chosen answers' mean token loss */
  eval_nll_loss?: number;
  /** ORPO: mean log sigmoid of the log odds ratio (the term weighted by beta) */
  eval_log_odds_ratio?: number;
  /** ORPO: mean log odds ratio of chosen over rejected */
  eval_log_odds_chosen?: number;
}

export interface TrainReply {
  status: "ok";
  /** cancelled: stopped by cancel after writing a checkpoint */
  outcome: "completed" | "cancelled";
  method: "lora" | "full";
  output_dir: string;
  /** LoRA: the peft adapter folder (the run folder when completed, the last checkpoint when cancelled) */
  adapter_path?: string;
  /** Full fine-tuning: the transformers model folder */
  model_path?: string;
  step: number;
  total_steps: number;
  epoch: number;
  final_loss?: number;
  best_eval_loss?: number;
  final_eval_loss?: number;
  /** Tokens trained on in this session of the run */
  tokens: number;
  tokens_per_s: number;
  elapsed_s: number;
  checkpoints: Array<string>;
  dataset: DatasetStats;
  history: Array<TrainHistoryEntry>;
  resumed_from?: string;
  notes: Array<string>;
  reports?: ReportLocations;
  /** The preference method of a preference run (absent: supervised fine-tuning) */
  preference?: "dpo" | "orpo" | "simpo";
  /** A preference run's last reported metrics (rewards/margins, rewards/accuracies, ...), under TRL's names */
  final_metrics?: Record<string, number>;
}

export interface TrainPreviewRequest {
  /** The model whose tokenizer and chat template render the rows */
  model_id: string;
  /** minItems 1 */
  datasets: Array<DatasetSource>;
  /**
   * Examples to render, taken from the sources in turn
   * minimum 1; maximum 100
   * @default 3
   */
  n?: number;
  /** minimum 2 */
  max_length?: number;
  /** @default 42 */
  seed?: number;
  /**
   * Read the rows as preference pairs {prompt | messages, chosen, rejected} and render both answers
   * @default false
   */
  preference?: boolean;
}

export interface PreviewSegment {
  text: string;
  /** true: the loss is computed on these tokens; false: masked (-100) */
  trained: boolean;
}

export interface PreviewExample {
  source: string;
  /** 1-based row (line for JSONL) in the source */
  row: number;
  tokens: number;
  trained_tokens: number;
  truncated: boolean;
  segments: Array<PreviewSegment>;
}

export interface TrainPreviewReply {
  status: "ok";
  examples: Array<PreviewExample>;
  /** A preference preview's pairs (examples is then empty) */
  pairs?: Array<PreviewPair>;
}

export interface PreviewAnswer {
  tokens: number;
  /** The answer's scored tokens */
  trained_tokens: number;
  truncated: boolean;
  segments: Array<PreviewSegment>;
}

export interface PreviewPair {
  source: string;
  /** 1-based row (line for JSONL) in the source */
  row: number;
  chosen: PreviewAnswer;
  rejected: PreviewAnswer;
}

export interface AdapterInfo {
  /** What generate's adapter field names it by */
  name: string;
  path: string;
  r?: number;
  alpha?: number;
  targets: Array<string>;
  /** The base model the adapter was trained on, as its adapter_config.json says */
  base_model?: string;
}

export interface AdapterLoadRequest {
  model_id: string;
  /**
   * Absolute path of a peft adapter folder
   * minLength 1
   */
  path: string;
  /**
   * Default: from the folder's name; loading the same folder again is a no-op (or a reload when its weights changed)
   * pattern "^[A-Za-z0-9_-]+$"
   */
  name?: string;
}

export interface AdapterLoadReply {
  status: "ok";
  adapter: AdapterInfo;
  /** It was loaded before and its weights on disk had changed */
  reloaded: boolean;
  /** Every adapter now on the model */
  adapters: Array<AdapterInfo>;
}

export interface AdapterUnloadRequest {
  model_id: string;
  name: string;
}

export interface AdapterUnloadReply {
  status: "ok";
  /** false when no adapter of that name was loaded */
  unloaded: boolean;
  adapters: Array<AdapterInfo>;
}

export interface AdapterListRequest {
  model_id: string;
}

export interface AdapterListReply {
  status: "ok";
  adapters: Array<AdapterInfo>;
}

/** A training run this worker (or an earlier one, through the on-disk run index) started; run_id is the msg_id of the train request that started it */
export interface RunInfo {
  run_id: string;
  model_id: string;
  output_dir: string;
  /** The session of the client that started the run */
  session: string;
  started: string;
  /** When it ended (or, interrupted, when a new worker found it cut short) */
  ended?: string;
  /** interrupted: its worker died mid-run (resume it from checkpoint); resumed: an interrupted run another run (resumed_by) continues */
  state: "running" | "completed" | "cancelled" | "failed" | "interrupted" | "resumed";
  step: number;
  total_steps?: number;
  /** Why a failed run failed */
  error?: string;
  /** The newest complete checkpoint-<step> folder */
  checkpoint?: string;
  resume?: RunResume;
  /** run_id of the run that continued this interrupted one */
  resumed_by?: string;
}

/** What continuing a run takes: loading its model again, then this train request with resume_from set to a checkpoint */
export interface RunResume {
  load: LoadRequest;
  train: {
    config: TrainOptions;
    datasets: Array<DatasetSource>;
    distributed?: DistributedOptions;
  };
}

export type RunsRequest = Record<string, never>;

export interface RunsReply {
  status: "ok";
  runs: Array<RunInfo>;
}

/** Replays the run's kept events (train_begin and the latest 2000 others), then streams its live events until it ends; cancelling the watch leaves the run running */
export interface RunWatchRequest {
  /** minLength 1 */
  run_id: string;
}

export interface RunWatchReply {
  status: "ok";
  run: RunInfo;
}

export interface GpuEvent {
  devices: Array<DeviceMemory>;
  /** The paged engines' caches, as in StatusReply; absent when they could not be read */
  engines?: Array<EngineCache>;
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
  save: { request: SaveRequest; reply: ExportReply; events: "export_progress" };
  export: { request: ExportRequest; reply: ExportReply; events: "export_progress" };
  serve_start: { request: ServeStartRequest; reply: ServeStartReply; events: never };
  serve_stop: { request: ServeStopRequest; reply: ServeStopReply; events: never };
  serve_status: { request: ServeStatusRequest; reply: ServeStatusReply; events: never };
  train: { request: TrainRequest; reply: TrainReply; events: "train_begin" | "train_progress" | "eval" | "checkpoint" };
  train_preview: { request: TrainPreviewRequest; reply: TrainPreviewReply; events: never };
  adapter_load: { request: AdapterLoadRequest; reply: AdapterLoadReply; events: never };
  adapter_unload: { request: AdapterUnloadRequest; reply: AdapterUnloadReply; events: never };
  adapter_list: { request: AdapterListRequest; reply: AdapterListReply; events: never };
  runs: { request: RunsRequest; reply: RunsReply; events: never };
  run_watch: { request: RunWatchRequest; reply: RunWatchReply; events: "train_begin" | "train_progress" | "eval" | "checkpoint" };
}

/** Events streamed for a request, keyed by msg_type. */
export interface EventMap {
  token: TokenEvent;
  load_progress: LoadProgressEvent;
  export_progress: ExportProgressEvent;
  train_begin: TrainBeginEvent;
  train_progress: TrainProgressEvent;
  eval: EvalEvent;
  checkpoint: CheckpointEvent;
}

/** Worker-wide telemetry on the PUB socket, keyed by topic (msg_type). */
export interface BroadcastMap {
  gpu: GpuEvent;
  worker_status: WorkerStatusEvent;
}

export type RequestType = keyof RequestMap;
export type EventType = keyof EventMap;
export type BroadcastType = keyof BroadcastMap;

export const REQUEST_TYPES: readonly RequestType[] = ["hello", "load", "unload", "generate", "cancel", "status", "shutdown", "save", "export", "serve_start", "serve_stop", "serve_status", "train", "train_preview", "adapter_load", "adapter_unload", "adapter_list", "runs", "run_watch"];
export const EVENT_TYPES: readonly EventType[] = ["token", "load_progress", "export_progress", "train_begin", "train_progress", "eval", "checkpoint"];
export const BROADCAST_TYPES: readonly BroadcastType[] = ["gpu", "worker_status"];

/** TrainOptions's fields, in schema order. */
export const TRAIN_OPTIONS_FIELDS = ["output_dir", "method", "lora", "max_length", "truncation", "batch_size", "grad_accum", "epochs", "max_steps", "lr", "schedule", "warmup", "optimizer", "weight_decay", "adam_betas", "adam_eps", "max_grad_norm", "dtype", "gradient_checkpointing", "activation_memory_gb", "packing", "compile", "eval_split", "eval_every", "save_every", "log_every", "seed", "resume_from", "overwrite", "report", "preference", "init_adapter"] as const satisfies ReadonlyArray<keyof TrainOptions>;

/** What the worker uses for each TrainOptions field with a default when it is absent. */
export const TRAIN_OPTIONS_DEFAULTS = {
  method: "lora",
  max_length: 1024,
  truncation: "truncate",
  batch_size: 4,
  grad_accum: 4,
  epochs: 3,
  lr: 0.0001,
  schedule: "cosine",
  warmup: 0,
  optimizer: "adamw",
  weight_decay: 0,
  adam_betas: [0.9, 0.999],
  adam_eps: 1e-8,
  max_grad_norm: 1,
  dtype: "auto",
  gradient_checkpointing: false,
  packing: false,
  compile: false,
  eval_split: 0,
  eval_every: 0,
  save_every: 0,
  log_every: 1,
  seed: 42,
  overwrite: false,
  report: [],
} as const satisfies { readonly [K in keyof TrainOptions]?: unknown };

/** The values each enum field of TrainOptions allows. */
export const TRAIN_OPTIONS_ENUMS = {
  method: ["lora", "full"],
  truncation: ["truncate", "drop"],
  schedule: ["cosine", "linear", "constant"],
  optimizer: ["adamw"],
  dtype: ["auto", "bf16", "fp16", "fp32"],
} as const satisfies { readonly [K in keyof TrainOptions]?: ReadonlyArray<TrainOptions[K]> };

/** LoraOptions's fields, in schema order. */
export const LORA_OPTIONS_FIELDS = ["r", "alpha", "dropout", "targets"] as const satisfies ReadonlyArray<keyof LoraOptions>;

/** What the worker uses for each LoraOptions field with a default when it is absent. */
export const LORA_OPTIONS_DEFAULTS = {
  r: 8,
  dropout: 0,
  targets: "all-linear",
} as const satisfies { readonly [K in keyof LoraOptions]?: unknown };

/** The values each enum field of LoraOptions allows. */
export const LORA_OPTIONS_ENUMS = {} as const satisfies { readonly [K in keyof LoraOptions]?: ReadonlyArray<LoraOptions[K]> };

/** DistributedOptions's fields, in schema order. */
export const DISTRIBUTED_OPTIONS_FIELDS = ["strategy", "devices", "cluster"] as const satisfies ReadonlyArray<keyof DistributedOptions>;

/** What the worker uses for each DistributedOptions field with a default when it is absent. */
export const DISTRIBUTED_OPTIONS_DEFAULTS = {
  strategy: "ddp",
} as const satisfies { readonly [K in keyof DistributedOptions]?: unknown };

/** The values each enum field of DistributedOptions allows. */
export const DISTRIBUTED_OPTIONS_ENUMS = {
  strategy: ["ddp", "fsdp"],
} as const satisfies { readonly [K in keyof DistributedOptions]?: ReadonlyArray<DistributedOptions[K]> };
