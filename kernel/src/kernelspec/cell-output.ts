// What a cell prints for its error and its last value. tslab's executor prints an error with
// console.error(e), so Node shows the stack, every own property (a WorkerError's whole Python
// traceback as a quoted array) and, for errors thrown synchronously, a source-line snippet; and it
// prints the last value with console.log(value), also values a widget has just drawn. The kernel
// hands tslab a console that prints one line per error and skips what a widget showed.
import { debugErrors, errorLine, errorReport } from "../display/error-info";
import { isShown } from "../display/shown";

/** The console tslab's createExecutor takes. */
export interface ExecutorConsole {
  log(...args: unknown[]): void;
  error(...args: unknown[]): void;
}

/** Where one printed error goes; null when nothing is printed. */
export interface CellText {
  stream: "stdout" | "stderr";
  text: string;
}

const INTERRUPT_MESSAGES = new Set([
  // tslab rejects the running cell with this when the interrupt button is pressed.
  "Interrupted asynchronously",
  // Node's breakOnSigint, for synchronous code.
  "Script execution was interrupted by `SIGINT`",
]);

/** True for the error tslab (or Node) ends an interrupted cell with. */
export function isInterrupt(error: unknown): boolean {
  return error instanceof Error && INTERRUPT_MESSAGES.has(error.message);
}

export interface ErrorContext {
  /** qwen.debug(true): print stacks and tracebacks in full. */
  debug: boolean;
  /** The cell has drawn a widget (which shows its own cancelled or failed state). */
  widgetShown: boolean;
}

/**
 * An interrupt is a normal action: no red error, at most one quiet line (none when a widget in
 * the cell shows the cancelled state). An error a widget already shows is not printed again.
 * Any other error is one line, `Name: message`; in debug mode, the full stack and traceback.
 */
export function cellErrorOutput(error: unknown, context: ErrorContext): CellText | null {
  if (isInterrupt(error)) return context.widgetShown ? null : { stream: "stdout", text: "Interrupted\n" };
  if (context.debug) return { stream: "stderr", text: `${errorReport(error)}\n` };
  if (isShown(error)) return null;
  return { stream: "stderr", text: `${errorLine(error)}\n` };
}

/**
 * The console for tslab's executor. Its one-argument calls are a cell's error or last value;
 * calls with a format string (TypeScript diagnostics) go to `base` unchanged.
 */
export function cellConsole(base: ExecutorConsole, widgetShown: () => boolean, write: (out: CellText) => void): ExecutorConsole {
  return {
    log(...args) {
      if (args.length === 1 && isShown(args[0])) return;
      base.log(...args);
    },
    error(...args) {
      if (args.length !== 1) return base.error(...args);
      const out = cellErrorOutput(args[0], { debug: debugErrors(), widgetShown: widgetShown() });
      if (out) write(out);
    },
  };
}
