// Do not edit: written by extension/scripts/gen-types.mjs from schema/bundles.json.
// Change the schema and run `npm run build:types -w extension`.

export type ChatState = "generating" | "done" | "cancelled" | "error";
export type TrainState = "running" | "done" | "cancelled" | "failed";

/**
 * A chat transcript. While generating, the last message is the assistant reply so far. In a conversation, messages is the new turn and earlier the turns before it.
 */
export interface ChatBundle {
  version: 1;
  state: ChatState;
  /**
   * Model id or folder, shown in the header
   */
  model?: string;
  messages: ChatMessage[];
  /**
   * A conversation's messages from before this turn (its system prompt included), oldest first. Drawn collapsed behind an "N earlier turns" marker, N being the user messages here; messages holds only the new turn.
   */
  earlier?: ChatMessage[];
  stats?: ChatStats;
  error?: ErrorInfo;
}
export interface ChatMessage {
  role: "system" | "user" | "assistant";
  content: string;
}
export interface ChatStats {
  completionTokens: number;
  promptTokens?: number;
  /**
   * Time to first token
   */
  ttftMs?: number;
  durationMs?: number;
  tokensPerSecond?: number;
  finishReason?: "stop" | "length" | "stop_string" | "cancelled";
}
export interface ErrorInfo {
  /**
   * Exception class, e.g. OutOfMemoryError
   */
  name: string;
  message: string;
  /**
   * What the user can do about it
   */
  hint?: string;
}
/**
 * A training run. Series are parallel arrays (one entry per logged step) to keep saved notebooks small.
 */
export interface TrainBundle {
  version: 1;
  state: TrainState;
  title?: string;
  progress: TrainProgress;
  train: TrainSeries;
  eval?: EvalSeries;
  /**
   * The run's options, flat, in display order
   */
  config?: {
    [k: string]: string | number | boolean | null | undefined;
  };
  /**
   * Folder of the last checkpoint written
   */
  checkpoint?: string;
  error?: ErrorInfo;
}
export interface TrainProgress {
  step: number;
  totalSteps: number;
  /**
   * Fractional epoch, e.g. 1.25
   */
  epoch?: number;
  /**
   * Passes over the data the run makes: totalSteps over the steps per epoch
   */
  totalEpochs?: number;
  /**
   * The epochs the run's options named, sent only when maxSteps set the run's length instead (so totalEpochs differs from it)
   */
  epochsOption?: number;
  elapsedS?: number;
  etaS?: number;
  tokensPerSecond?: number;
}
/**
 * Parallel arrays of equal length, oldest first; lr may be empty when not logged
 */
export interface TrainSeries {
  step: number[];
  loss: (number | null)[];
  lr?: number[];
}
/**
 * Parallel arrays of equal length, oldest first
 */
export interface EvalSeries {
  step: number[];
  loss: (number | null)[];
}
/**
 * Memory of each device the worker uses; a CPU-only worker reports its process RAM as one cpu device.
 */
export interface GpuBundle {
  version: 1;
  devices: DeviceGauge[];
  /**
   * Unix time in seconds of the newest sample
   */
  time?: number;
  /**
   * Seconds between history samples
   */
  intervalS?: number;
  /**
   * True while the gauge is still being updated
   */
  live?: boolean;
}
export interface DeviceGauge {
  /**
   * cuda:0, or cpu for process memory
   */
  device: string;
  kind: "cuda" | "cpu";
  name?: string;
  /**
   * Bytes allocated by tensors (cuda) or process RSS (cpu)
   */
  used: number;
  /**
   * Bytes held by the caching allocator (cuda only)
   */
  reserved?: number;
  peak?: number;
  /**
   * Bytes on the device, or machine RAM for cpu
   */
  total: number;
  /**
   * Recent used bytes, oldest first
   */
  history?: number[];
}

/** Each custom MIME type and the bundle it carries. */
export interface BundleMimeTypes {
  "application/vnd.qwenbook.chat+json": ChatBundle;
  "application/vnd.qwenbook.train+json": TrainBundle;
  "application/vnd.qwenbook.gpu+json": GpuBundle;
}
