// Do not edit: written by extension/scripts/gen-types.mjs from python-bridge/qwenbook_bridge/schema/bundles.json.
// Change the schema and run `npm run build:types -w extension` (the build does it when the schema is newer).

/** The bundle version this build reads; the schema pins it with `const`. */
export const BUNDLE_VERSION = 1;

/** The custom MIME types, one per bundle. */
export const CHAT_MIME = "application/vnd.qwenbook.chat+json";
export const TRAIN_MIME = "application/vnd.qwenbook.train+json";
export const GPU_MIME = "application/vnd.qwenbook.gpu+json";

export type ChatState = "generating" | "done" | "cancelled" | "error";
export type TrainState = "running" | "done" | "cancelled" | "failed";
/**
 * One device's memory as the worker's gpu telemetry reports it (protocol.json's DeviceMemory: the shape is declared there once), with its recent history.
 */
export type DeviceGauge = DeviceMemory & {
  /**
   * Recent used bytes, oldest first
   */
  history?: number[];
};

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
  role: "system" | "user" | "assistant" | "tool";
  content: string;
  /**
   * An assistant's thinking before its answer (Qwen3): a collapsible Thinking block, open while it streams, folded once the answer starts
   */
  reasoning?: string;
  /**
   * Tokens the thinking took, shown on the folded block
   */
  reasoningTokens?: number;
  /**
   * How long the thinking took, shown on the folded block
   */
  reasoningMs?: number;
  /**
   * Calls an assistant turn made, drawn as cards (name and arguments) rather than raw tags
   */
  toolCalls?: ChatToolCall[];
  /**
   * On a tool message: the tool whose result it is
   */
  name?: string;
}
export interface ChatToolCall {
  name: string;
  arguments: {};
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
  finishReason?: "stop" | "tool_calls" | "length" | "stop_string" | "cancelled";
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
  /**
   * A preference run's metrics under TRL's names (rewards/margins, rewards/accuracies, rewards/chosen, rewards/rejected, ORPO's log_odds_ratio, ...), each parallel to step
   */
  metrics?: {
    [k: string]: (number | null)[] | undefined;
  };
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
   * The paged engines' key/value caches in the newest sample (protocol.json's EngineCache), each shown under the device its device field names
   */
  engines?: EngineCache[];
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
export interface DeviceMemory {
  /**
   * cuda:0, or cpu for process memory
   */
  device: string;
  kind: "cuda" | "cpu";
  name?: string;
  /**
   * bytes: allocated by tensors (cuda) or process RSS (cpu)
   */
  used: number;
  /**
   * bytes held by the caching allocator (cuda only)
   */
  reserved?: number;
  /**
   * bytes, peak allocated since start or last reset
   */
  peak?: number;
  /**
   * bytes on the device, or machine RAM for cpu
   */
  total: number;
}
/**
 * A live paged engine's key/value cache, sized when the engine started: a model's notebook chat engine or an OpenAI-compatible server's engine.
 */
export interface EngineCache {
  model_id: string;
  /**
   * chat: the engine notebook chats with the model decode on; server: an HTTP server's
   */
  role: "chat" | "server";
  /**
   * Where the cache lives, named as DeviceMemory.device: cuda:0, or cpu
   */
  device: string;
  blocks_total: number;
  /**
   * Blocks held by running requests (cached prefixes nobody holds are free to reuse)
   */
  blocks_used: number;
  /**
   * Tokens per block
   */
  block_size: number;
  /**
   * Memory the cache takes
   */
  cache_bytes: number;
  /**
   * Share of the device the cache was sized with (vLLM's gpu_memory_utilization); absent when the engine was given a fixed block count
   */
  memory_utilization?: number;
  /**
   * Of the prompt tokens looked up in the prefix cache, the share found there
   */
  prefix_hit_rate: number;
  /**
   * Requests decoding
   */
  running: number;
  /**
   * Requests queued behind a full batch
   */
  waiting: number;
}

/** Each custom MIME type and the bundle it carries. */
export interface BundleMimeTypes {
  [CHAT_MIME]: ChatBundle;
  [TRAIN_MIME]: TrainBundle;
  [GPU_MIME]: GpuBundle;
}

export type BundleMime = keyof BundleMimeTypes;

/** Schema `$defs` entry for each MIME type, as listed in the schema's `x-mime-types`. */
export const BUNDLE_DEF: Readonly<Record<BundleMime, string>> = {
  [CHAT_MIME]: "ChatBundle",
  [TRAIN_MIME]: "TrainBundle",
  [GPU_MIME]: "GpuBundle",
};

/** The schema the renderers validate with, protocol.json's types it uses copied in. */
export const BUNDLE_SCHEMA: Readonly<Record<string, unknown>> & { readonly $id: string } = {
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "$id": "https://qwenbook.dev/schema/bundles.json",
  "title": "Qwenbook display bundles",
  "description": "The JSON payloads of the three custom MIME types that the kernel writes and the JupyterLab extension renders; both generate their types and MIME type constants from this file. Renderers ignore unknown fields, so additions that old renderers can skip keep the version; a change old renderers would misread bumps it.",
  "x-mime-types": {
    "application/vnd.qwenbook.chat+json": "ChatBundle",
    "application/vnd.qwenbook.train+json": "TrainBundle",
    "application/vnd.qwenbook.gpu+json": "GpuBundle"
  },
  "$defs": {
    "ChatBundle": {
      "type": "object",
      "description": "A chat transcript. While generating, the last message is the assistant reply so far. In a conversation, messages is the new turn and earlier the turns before it.",
      "required": [
        "version",
        "state",
        "messages"
      ],
      "properties": {
        "version": {
          "const": 1
        },
        "state": {
          "$ref": "#/$defs/ChatState"
        },
        "model": {
          "type": "string",
          "description": "Model id or folder, shown in the header"
        },
        "messages": {
          "type": "array",
          "items": {
            "$ref": "#/$defs/ChatMessage"
          }
        },
        "earlier": {
          "type": "array",
          "items": {
            "$ref": "#/$defs/ChatMessage"
          },
          "description": "A conversation's messages from before this turn (its system prompt included), oldest first. Drawn collapsed behind an \"N earlier turns\" marker, N being the user messages here; messages holds only the new turn."
        },
        "stats": {
          "$ref": "#/$defs/ChatStats"
        },
        "error": {
          "$ref": "#/$defs/ErrorInfo"
        }
      }
    },
    "ChatState": {
      "enum": [
        "generating",
        "done",
        "cancelled",
        "error"
      ]
    },
    "ChatMessage": {
      "type": "object",
      "required": [
        "role",
        "content"
      ],
      "properties": {
        "role": {
          "enum": [
            "system",
            "user",
            "assistant",
            "tool"
          ]
        },
        "content": {
          "type": "string"
        },
        "reasoning": {
          "type": "string",
          "description": "An assistant's thinking before its answer (Qwen3): a collapsible Thinking block, open while it streams, folded once the answer starts"
        },
        "reasoningTokens": {
          "type": "integer",
          "minimum": 0,
          "description": "Tokens the thinking took, shown on the folded block"
        },
        "reasoningMs": {
          "type": "number",
          "minimum": 0,
          "description": "How long the thinking took, shown on the folded block"
        },
        "toolCalls": {
          "type": "array",
          "items": {
            "$ref": "#/$defs/ChatToolCall"
          },
          "description": "Calls an assistant turn made, drawn as cards (name and arguments) rather than raw tags"
        },
        "name": {
          "type": "string",
          "description": "On a tool message: the tool whose result it is"
        }
      }
    },
    "ChatToolCall": {
      "type": "object",
      "required": [
        "name",
        "arguments"
      ],
      "properties": {
        "name": {
          "type": "string"
        },
        "arguments": {
          "type": "object"
        }
      }
    },
    "ChatStats": {
      "type": "object",
      "required": [
        "completionTokens"
      ],
      "properties": {
        "completionTokens": {
          "type": "integer",
          "minimum": 0
        },
        "promptTokens": {
          "type": "integer",
          "minimum": 0
        },
        "ttftMs": {
          "type": "number",
          "minimum": 0,
          "description": "Time to first token"
        },
        "durationMs": {
          "type": "number",
          "minimum": 0
        },
        "tokensPerSecond": {
          "type": "number",
          "minimum": 0
        },
        "finishReason": {
          "enum": [
            "stop",
            "tool_calls",
            "length",
            "stop_string",
            "cancelled"
          ]
        }
      }
    },
    "ErrorInfo": {
      "type": "object",
      "required": [
        "name",
        "message"
      ],
      "properties": {
        "name": {
          "type": "string",
          "description": "Exception class, e.g. OutOfMemoryError"
        },
        "message": {
          "type": "string"
        },
        "hint": {
          "type": "string",
          "description": "What the user can do about it"
        }
      }
    },
    "TrainBundle": {
      "type": "object",
      "description": "A training run. Series are parallel arrays (one entry per logged step) to keep saved notebooks small.",
      "required": [
        "version",
        "state",
        "progress",
        "train"
      ],
      "properties": {
        "version": {
          "const": 1
        },
        "state": {
          "$ref": "#/$defs/TrainState"
        },
        "title": {
          "type": "string"
        },
        "progress": {
          "$ref": "#/$defs/TrainProgress"
        },
        "train": {
          "$ref": "#/$defs/TrainSeries"
        },
        "eval": {
          "$ref": "#/$defs/EvalSeries"
        },
        "config": {
          "type": "object",
          "description": "The run's options, flat, in display order",
          "additionalProperties": {
            "type": [
              "string",
              "number",
              "boolean",
              "null"
            ]
          }
        },
        "checkpoint": {
          "type": "string",
          "description": "Folder of the last checkpoint written"
        },
        "error": {
          "$ref": "#/$defs/ErrorInfo"
        }
      }
    },
    "TrainState": {
      "enum": [
        "running",
        "done",
        "cancelled",
        "failed"
      ]
    },
    "TrainProgress": {
      "type": "object",
      "required": [
        "step",
        "totalSteps"
      ],
      "properties": {
        "step": {
          "type": "integer",
          "minimum": 0
        },
        "totalSteps": {
          "type": "integer",
          "minimum": 0
        },
        "epoch": {
          "type": "number",
          "minimum": 0,
          "description": "Fractional epoch, e.g. 1.25"
        },
        "totalEpochs": {
          "type": "number",
          "minimum": 0,
          "description": "Passes over the data the run makes: totalSteps over the steps per epoch"
        },
        "epochsOption": {
          "type": "number",
          "minimum": 0,
          "description": "The epochs the run's options named, sent only when maxSteps set the run's length instead (so totalEpochs differs from it)"
        },
        "elapsedS": {
          "type": "number",
          "minimum": 0
        },
        "etaS": {
          "type": "number",
          "minimum": 0
        },
        "tokensPerSecond": {
          "type": "number",
          "minimum": 0
        }
      }
    },
    "TrainSeries": {
      "type": "object",
      "description": "Parallel arrays of equal length, oldest first; lr may be empty when not logged",
      "required": [
        "step",
        "loss"
      ],
      "properties": {
        "step": {
          "type": "array",
          "items": {
            "type": "integer"
          }
        },
        "loss": {
          "type": "array",
          "items": {
            "type": [
              "number",
              "null"
            ]
          }
        },
        "lr": {
          "type": "array",
          "items": {
            "type": "number"
          }
        },
        "metrics": {
          "type": "object",
          "description": "A preference run's metrics under TRL's names (rewards/margins, rewards/accuracies, rewards/chosen, rewards/rejected, ORPO's log_odds_ratio, ...), each parallel to step",
          "additionalProperties": {
            "type": "array",
            "items": {
              "type": [
                "number",
                "null"
              ]
            }
          }
        }
      }
    },
    "EvalSeries": {
      "type": "object",
      "description": "Parallel arrays of equal length, oldest first",
      "required": [
        "step",
        "loss"
      ],
      "properties": {
        "step": {
          "type": "array",
          "items": {
            "type": "integer"
          }
        },
        "loss": {
          "type": "array",
          "items": {
            "type": [
              "number",
              "null"
            ]
          }
        }
      }
    },
    "GpuBundle": {
      "type": "object",
      "description": "Memory of each device the worker uses; a CPU-only worker reports its process RAM as one cpu device.",
      "required": [
        "version",
        "devices"
      ],
      "properties": {
        "version": {
          "const": 1
        },
        "devices": {
          "type": "array",
          "items": {
            "$ref": "#/$defs/DeviceGauge"
          }
        },
        "engines": {
          "type": "array",
          "items": {
            "$ref": "#/$defs/EngineCache"
          },
          "description": "The paged engines' key/value caches in the newest sample (protocol.json's EngineCache), each shown under the device its device field names"
        },
        "time": {
          "type": "number",
          "description": "Unix time in seconds of the newest sample"
        },
        "intervalS": {
          "type": "number",
          "exclusiveMinimum": 0,
          "description": "Seconds between history samples"
        },
        "live": {
          "type": "boolean",
          "description": "True while the gauge is still being updated"
        }
      }
    },
    "DeviceGauge": {
      "description": "One device's memory as the worker's gpu telemetry reports it (protocol.json's DeviceMemory: the shape is declared there once), with its recent history.",
      "allOf": [
        {
          "$ref": "#/$defs/DeviceMemory"
        }
      ],
      "type": "object",
      "properties": {
        "history": {
          "type": "array",
          "items": {
            "type": "number"
          },
          "description": "Recent used bytes, oldest first"
        }
      }
    },
    "EngineCache": {
      "type": "object",
      "description": "A live paged engine's key/value cache, sized when the engine started: a model's notebook chat engine or an OpenAI-compatible server's engine.",
      "required": [
        "model_id",
        "role",
        "device",
        "blocks_total",
        "blocks_used",
        "block_size",
        "cache_bytes",
        "prefix_hit_rate",
        "running",
        "waiting"
      ],
      "properties": {
        "model_id": {
          "type": "string"
        },
        "role": {
          "enum": [
            "chat",
            "server"
          ],
          "description": "chat: the engine notebook chats with the model decode on; server: an HTTP server's"
        },
        "device": {
          "type": "string",
          "description": "Where the cache lives, named as DeviceMemory.device: cuda:0, or cpu"
        },
        "blocks_total": {
          "type": "integer",
          "minimum": 0
        },
        "blocks_used": {
          "type": "integer",
          "minimum": 0,
          "description": "Blocks held by running requests (cached prefixes nobody holds are free to reuse)"
        },
        "block_size": {
          "type": "integer",
          "minimum": 1,
          "description": "Tokens per block"
        },
        "cache_bytes": {
          "type": "integer",
          "minimum": 0,
          "description": "Memory the cache takes"
        },
        "memory_utilization": {
          "type": "number",
          "exclusiveMinimum": 0,
          "maximum": 1,
          "description": "Share of the device the cache was sized with (vLLM's gpu_memory_utilization); absent when the engine was given a fixed block count"
        },
        "prefix_hit_rate": {
          "type": "number",
          "minimum": 0,
          "maximum": 1,
          "description": "Of the prompt tokens looked up in the prefix cache, the share found there"
        },
        "running": {
          "type": "integer",
          "minimum": 0,
          "description": "Requests decoding"
        },
        "waiting": {
          "type": "integer",
          "minimum": 0,
          "description": "Requests queued behind a full batch"
        }
      }
    },
    "DeviceMemory": {
      "type": "object",
      "required": [
        "device",
        "kind",
        "used",
        "total"
      ],
      "properties": {
        "device": {
          "type": "string",
          "description": "cuda:0, or cpu for process memory"
        },
        "kind": {
          "enum": [
            "cuda",
            "cpu"
          ]
        },
        "name": {
          "type": "string"
        },
        "used": {
          "type": "integer",
          "minimum": 0,
          "description": "bytes: allocated by tensors (cuda) or process RSS (cpu)"
        },
        "reserved": {
          "type": "integer",
          "minimum": 0,
          "description": "bytes held by the caching allocator (cuda only)"
        },
        "peak": {
          "type": "integer",
          "minimum": 0,
          "description": "bytes, peak allocated since start or last reset"
        },
        "total": {
          "type": "integer",
          "minimum": 0,
          "description": "bytes on the device, or machine RAM for cpu"
        }
      }
    }
  }
};
