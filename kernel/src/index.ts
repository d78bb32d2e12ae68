export { qwen, Qwen, type QwenOptions } from "./api/qwen";
export { Model } from "./api/model";
export { ChatRequest, ChatStream, type ChatSettings } from "./api/chat";
export { Conversation, type ConversationOptions } from "./api/conversation";
export { Reply } from "./api/reply";
export type {
  AttentionImplementation,
  ChatMessage,
  DeviceMemory,
  Dtype,
  FinishReason,
  LoadOptions,
  ModelInfo,
  RunningRequest,
  WorkerStatus,
} from "./api/types";
export { WorkerError, WorkerExitedError } from "./bridge/errors";
export { DISPLAY_SINK_KEY, type DisplayBundle, type DisplayOptions, type DisplaySink } from "./display/sink";
