export { qwen, Qwen, type QwenOptions } from "./api/qwen";
export { Model } from "./api/model";
export { ChatRequest, ChatStream, type ChatSettings } from "./api/chat";
export { Conversation, type ConversationOptions, type ToolResult } from "./api/conversation";
export { Reply, ToolCallParseError } from "./api/reply";
export { GpuGauge, type GpuOptions } from "./api/gpu";
export { MergeRequest } from "./api/merge";
export { Server, type ServeOptions, type ServerStats } from "./api/serve";
export { ExportReport, type ExportDetails, type ExportFile } from "./api/report";
export { TrainRun } from "./api/train";
export { TrainingRun, type RunState, type WatchOptions } from "./api/runs";
export { TrainResult, type DatasetReport, type EvalPoint, type LossPoint } from "./api/train-result";
export { TrainPreview, type PreviewAnswer, type PreviewExample, type PreviewPair } from "./api/preview";
export type {
  LoraOptions,
  Optimizer,
  PreferenceMethod,
  PreferenceRunOptions,
  PreferenceSettings,
  Schedule,
  TrainDtype,
  TrainMethod,
  TrainSettings,
  Truncation,
} from "./api/train-config";
export type { PreferenceRow } from "./api/preference-rows";
export {
  SelfCognition,
  type AlpacaRow,
  type DatasetFormat,
  type DatasetInput,
  type DatasetOptions,
  type DatasetRow,
  type SelfCognitionLanguage,
  type SelfCognitionOptions,
  type ShareGptRow,
} from "./api/datasets";
export { AdapterModel, type AdapterInfo, type AdapterSource } from "./api/adapters";
export { Adapters } from "./api/qwen-adapters";
export type { ExportOptions, GgufType, SaveDtype, SaveOptions, SaveQuant } from "./api/export";
export type {
  AttentionImplementation,
  ChatMessage,
  DeviceMemory,
  Dtype,
  EngineCache,
  FinishReason,
  GroupSize,
  LoadOptions,
  LoadQuant,
  MalformedToolCall,
  ModelInfo,
  QualityFigures,
  QuantInfo,
  RunningRequest,
  ToolCall,
  ToolSpec,
  WorkerStatus,
} from "./api/types";
export { ModelNotLoadedError, WorkerError, WorkerExitedError } from "./bridge/errors";
export { DISPLAY_SINK_KEY, type DisplayBundle, type DisplayOptions, type DisplaySink } from "./display/sink";
