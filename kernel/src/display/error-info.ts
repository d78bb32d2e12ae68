import { inspect } from "node:util";
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

const DEBUG_KEY: unique symbol = Symbol.for("qwenbook.debug");
type GlobalWithDebug = typeof globalThis & { [DEBUG_KEY]?: boolean };

/** Whether the kernel prints errors in full (JS stack and Python traceback); see qwen.debug(). */
export function debugErrors(): boolean {
  return (globalThis as GlobalWithDebug)[DEBUG_KEY] === true;
}

/** Turns full error printing on or off for this process (the kernel and the package share it). */
export function setDebugErrors(on: boolean): void {
  (globalThis as GlobalWithDebug)[DEBUG_KEY] = on;
}

/**
 * The one line a notebook prints for a failed cell: `Name: message`. A worker error is named by
 * its Python exception and adds the exception it was raised from; a JS error adds its `cause`.
 * The full stack and Python traceback stay on the error object (and in {@link errorReport}).
 */
export function errorLine(error: unknown): string {
  if (error instanceof WorkerError) {
    const cause = error.pythonCause;
    return `${error.ename}: ${error.evalue}${cause ? ` (from ${cause})` : ""}`;
  }
  if (error instanceof WorkerExitedError) {
    const info = errorInfo(error);
    return `${info.name}: ${info.message} (${info.hint})`;
  }
  if (error instanceof Error) {
    const name = error.name || error.constructor?.name || "Error";
    const head = error.message === "" ? name : `${name}: ${error.message}`;
    const cause = (error as { cause?: unknown }).cause;
    if (cause === undefined) return head;
    return `${head} (cause: ${cause instanceof Error ? `${cause.name}: ${cause.message}` : String(cause)})`;
  }
  if (typeof error === "string") return error;
  return `Uncaught ${inspect(error, { depth: 2, breakLength: Infinity })}`;
}

/** Everything known about a failure, for qwen.debug(true): the JS stack, then the Python traceback. */
export function errorReport(error: unknown): string {
  if (!(error instanceof Error)) return errorLine(error);
  const parts = [error.stack ?? errorLine(error)];
  if (error instanceof WorkerError) {
    parts.push(`${error.request} failed in the worker:\n${error.pythonTraceback}`);
  } else if (error instanceof WorkerExitedError) {
    parts.push(`worker pid ${error.pid}, log ${error.log}`);
  }
  const cause = (error as { cause?: unknown }).cause;
  if (cause !== undefined) parts.push(`Caused by: ${errorReport(cause)}`);
  return parts.join("\n");
}
