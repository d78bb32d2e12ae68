// Types of the display bundles the JupyterLab extension renders, made from
// python-bridge/qwenbook_bridge/schema/bundles.json by kernel/scripts/gen-protocol.mjs.
// Edit the schema and run `npm run gen:protocol -w kernel`, not this file.
import type { DeviceMemory, EngineCache } from "../bridge/protocol.gen";

/** The bundle version this kernel writes; the extension refuses a newer one. */
export const BUNDLE_VERSION = 1;

/** The custom MIME types, one per bundle. */
export const CHAT_MIME = "application/vnd.qwenbook.chat+json";
export const TRAIN_MIME = "application/vnd.qwenbook.train+json";
export const GPU_MIME = "application/vnd.qwenbook.gpu+json";

/** A chat transcript. While generating, the last message is the assistant reply so far. In a conversation, messages is the new turn and earlier the turns before it. */
export interface ChatBundle {
  version: 1;
  state: ChatState;
  /** Model id or folder, shown in the header */
  model?: string;
  messages: Array<ChatMessage>;
  /** A conversation's messages from before this turn (its system prompt included), oldest first. Drawn collapsed behind an "N earlier turns" marker, N being the user messages here; messages holds only the new turn. */
  earlier?: Array<ChatMessage>;
  stats?: ChatStats;
  error?: ErrorInfo;
}

export type ChatState = "generating" | "done" | "cancelled" | "error";

export interface ChatMessage {
  role: "system" | "user" | "assistant" | "tool";
  content: string;
  /** An assistant's thinking before its answer (Qwen3): a collapsible Thinking block, open while it streams, folded once the answer starts */
  reasoning?: string;
  /**
   * Tokens the thinking took, shown on the folded block
   * minimum 0
   */
  reasoningTokens?: number;
  /**
   * How long the thinking took, shown on the folded block
   * minimum 0
   */
  reasoningMs?: number;
  /** Calls an assistant turn made, drawn as cards (name and arguments) rather than raw tags */
  toolCalls?: Array<ChatToolCall>;
  /** On a tool message: the tool whose result it is */
  name?: string;
}

export interface ChatToolCall {
  name: string;
  arguments: Record<string, unknown>;
}

export interface ChatStats {
  /** minimum 0 */
  completionTokens: number;
  /** minimum 0 */
  promptTokens?: number;
  /**
   * Time to first token
   * minimum 0
   */
  ttftMs?: number;
  /** minimum 0 */
  durationMs?: number;
  /** minimum 0 */
  tokensPerSecond?: number;
  finishReason?: "stop" | "tool_calls" | "length" | "stop_string" | "cancelled";
}

export interface ErrorInfo {
  /** Exception class, e.g. OutOfMemoryError */
  name: string;
  message: string;
  /** What the user can do about it */
  hint?: string;
}

/** A training run. Series are parallel arrays (one entry per logged step) to keep saved notebooks small. */
export interface TrainBundle {
  version: 1;
  state: TrainState;
  title?: string;
  progress: TrainProgress;
  train: TrainSeries;
  eval?: EvalSeries;
  /** The run's options, flat, in display order */
  config?: Record<string, string | number | boolean | null>;
  /** Folder of the last checkpoint written */
  checkpoint?: string;
  error?: ErrorInfo;
}

export type TrainState = "running" | "done" | "cancelled" | "failed";

export interface TrainProgress {
  /** minimum 0 */
  step: number;
  /** minimum 0 */
  totalSteps: number;
  /**
   * Fractional epoch, e.g. 1.25
   * minimum 0
   */
  epoch?: number;
  /**
   * Passes over the data the run makes: totalSteps over the steps per epoch
   * minimum 0
   */
  totalEpochs?: number;
  /**
   * The epochs the run's options named, sent only when maxSteps set the run's length instead (so totalEpochs differs from it)
   * minimum 0
   */
  epochsOption?: number;
  /** minimum 0 */
  elapsedS?: number;
  /** minimum 0 */
  etaS?: number;
  /** minimum 0 */
  tokensPerSecond?: number;
}

/** Parallel arrays of equal length, oldest first; lr may be empty when not logged */
export interface TrainSeries {
  step: Array<number>;
  loss: Array<number | null>;
  lr?: Array<number>;
  /** A preference run's metrics under TRL's names (rewards/margins, rewards/accuracies, rewards/chosen, rewards/rejected, ORPO's log_odds_ratio, ...), each parallel to step */
  metrics?: Record<string, Array<number | null>>;
}

/** Parallel arrays of equal length, oldest first */
export interface EvalSeries {
  step: Array<number>;
  loss: Array<number | null>;
}

/** Memory of each device the worker uses; a CPU-only worker reports its process RAM as one cpu device. */
export interface GpuBundle {
  version: 1;
  devices: Array<DeviceGauge>;
  /** The paged engines' key/value caches in the newest sample (protocol.json's EngineCache), each shown under the device its device field names */
  engines?: Array<EngineCache>;
  /** Unix time in seconds of the newest sample */
  time?: number;
  /**
   * Seconds between history samples
   * exclusiveMinimum 0
   */
  intervalS?: number;
  /** True while the gauge is still being updated */
  live?: boolean;
}

/** One device's memory as the worker's gpu telemetry reports it (protocol.json's DeviceMemory: the shape is declared there once), with its recent history. */
export type DeviceGauge = DeviceMemory & {
  /** Recent used bytes, oldest first */
  history?: Array<number>;
};

/** Each custom MIME type and the bundle it carries. */
export interface BundleMimeTypes {
  [CHAT_MIME]: ChatBundle;
  [TRAIN_MIME]: TrainBundle;
  [GPU_MIME]: GpuBundle;
}

export type BundleMime = keyof BundleMimeTypes;
