import { WorkerError, WorkerExitedError } from "../bridge/errors";
import type { ErrorInfo } from "./bundles";

/** Python exceptions whose cure is the same whatever the message says. */
const HINTS: Readonly<Record<string, string>> = {
  OutOfMemoryError: "Ask for fewer tokens, unload models you no longer need (m.unload()), or load this one with a smaller dtype.",
  DeviceUnavailableError: "Load the model on a device this worker has (\"cpu\", or \"cuda:N\" on a GPU machine).",
  ModelNotLoadedError: "The worker no longer holds this model; load it again with qwen.load().",
  TrainingOutOfMemoryError:
    "The base model is still loaded. Lower .batchSize() and raise .gradAccum() to keep the effective batch, add .gradientCheckpointing(), or shorten .maxLength().",
};

/** What an output shows about a failure: the exception's class, its message, and what to do. */
export function errorInfo(error: unknown): ErrorInfo {
  if (error instanceof WorkerError) {
    const hint = HINTS[error.ename];
    return hint ? { name: error.ename, message: error.evalue, hint } : { name: error.ename, message: error.evalue };
  }
  if (error instanceof WorkerExitedError) {
    return {
      name: error.name,
      message: firstLine(error.message),
      hint: `The worker's log is ${error.log}; the next call starts a new worker.`,
    };
  }
  if (error instanceof Error) return { name: error.name, message: error.message };
  return { name: "Error", message: String(error) };
}

function firstLine(s: string): string {
  const i = s.indexOf("\n");
  return i < 0 ? s : s.slice(0, i);
}
