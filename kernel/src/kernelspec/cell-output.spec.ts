import { afterEach, describe, expect, it } from "vitest";
import { WorkerError } from "../bridge/errors";
import { setDebugErrors } from "../display/error-info";
import { markShown } from "../display/shown";
import { cellConsole, cellErrorOutput, type CellText } from "./cell-output";

const CHAINED = [
  "Traceback (most recent call last):",
  '  File "/venv/lib/python3.11/site-packages/httpx/_transports/default.py", line 101, in map_httpcore_exceptions',
  "    yield",
  "httpx.ConnectError: [Errno -3] Temporary failure in name resolution",
  "",
  "The above exception was the direct cause of the following exception:",
  "",
  "Traceback (most recent call last):",
  '  File "/repo/python-bridge/qwenbook_bridge/engine/models/hub.py", line 170, in resolve_hub_model',
  "    raise ModelNotFoundError(",
  "qwenbook_bridge.engine.errors.ModelNotFoundError: Qwen/Qwen2.5-0.5B-Instruct could not be fetched",
];

function workerError(traceback = CHAINED): WorkerError {
  return new WorkerError("load", "ModelNotFoundError", "Qwen/Qwen2.5-0.5B-Instruct could not be fetched", traceback);
}

const plain = { debug: false, widgetShown: false };

afterEach(() => setDebugErrors(false));

describe("cellErrorOutput", () => {
  it("prints a worker error as one line: the Python exception and the exception it was raised from", () => {
    expect(cellErrorOutput(workerError(), plain)).toEqual({
      stream: "stderr",
      text:
        "ModelNotFoundError: Qwen/Qwen2.5-0.5B-Instruct could not be fetched " +
        "(from ConnectError: [Errno -3] Temporary failure in name resolution)\n",
    });
    // Without a chained exception, just the exception; the traceback stays on the error.
    const e = workerError(CHAINED.slice(7));
    expect(cellErrorOutput(e, plain)?.text).toBe("ModelNotFoundError: Qwen/Qwen2.5-0.5B-Instruct could not be fetched\n");
    expect(e.traceback).toHaveLength(4);
  });

  it("prints a JS error as `Name: message`, without its stack, and adds its cause", () => {
    const e = new RangeError("lora option r must be at least 1, got 0");
    expect(e.stack).toContain("\n    at ");
    expect(cellErrorOutput(e, plain)).toEqual({ stream: "stderr", text: "RangeError: lora option r must be at least 1, got 0\n" });
    const wrapped = new Error("could not save", { cause: new TypeError("bad path") });
    expect(cellErrorOutput(wrapped, plain)?.text).toBe("Error: could not save (cause: TypeError: bad path)\n");
    expect(cellErrorOutput("plain string", plain)?.text).toBe("plain string\n");
  });

  it("prints the JS stack and the Python traceback in debug mode", () => {
    const out = cellErrorOutput(workerError(), { ...plain, debug: true });
    expect(out?.stream).toBe("stderr");
    expect(out?.text).toContain("WorkerError: load failed: ModelNotFoundError");
    expect(out?.text).toContain("\n    at ");
    expect(out?.text).toContain("load failed in the worker:\nTraceback (most recent call last):");
    expect(out?.text).toContain("httpx.ConnectError: [Errno -3]");
  });

  it("prints nothing for an error a widget already shows (except in debug mode)", () => {
    const e = markShown(workerError());
    expect(cellErrorOutput(e, plain)).toBeNull();
    expect(cellErrorOutput(e, { ...plain, debug: true })?.text).toContain("Traceback");
  });

  it("ends an interrupted cell quietly: nothing under a widget, else one line on stdout", () => {
    const interrupted = new Error("Interrupted asynchronously");
    expect(cellErrorOutput(interrupted, { ...plain, widgetShown: true })).toBeNull();
    expect(cellErrorOutput(interrupted, plain)).toEqual({ stream: "stdout", text: "Interrupted\n" });
    expect(cellErrorOutput(new Error("Script execution was interrupted by `SIGINT`"), plain)?.stream).toBe("stdout");
  });
});

describe("cellConsole", () => {
  function recording(widget = false) {
    const base: unknown[][] = [];
    const written: CellText[] = [];
    const console = cellConsole(
      { log: (...a) => void base.push(["log", ...a]), error: (...a) => void base.push(["error", ...a]) },
      () => widget,
      (out) => void written.push(out),
    );
    return { base, written, console };
  }

  it("does not echo a value a widget has shown, and prints every other value as before", () => {
    const { base, console } = recording();
    const reply = markShown({ text: "hi" });
    console.log(reply);
    console.log({ text: "hi" });
    console.log(42);
    expect(base).toEqual([
      ["log", { text: "hi" }],
      ["log", 42],
    ]);
  });

  it("formats a cell's error and passes TypeScript diagnostics (a format string) through", () => {
    const { base, written, console } = recording();
    console.error(new TypeError("x is not a function"));
    console.error("%s%d:%d - %s", "", 1, 7, "Cannot find name 'm'.");
    expect(written).toEqual([{ stream: "stderr", text: "TypeError: x is not a function\n" }]);
    expect(base).toEqual([["error", "%s%d:%d - %s", "", 1, 7, "Cannot find name 'm'."]]);
  });

  it("follows qwen.debug() as it is when the error is printed", () => {
    const { written, console } = recording();
    setDebugErrors(true);
    console.error(new Error("boom"));
    expect(written[0].text).toMatch(/^Error: boom\n    at /);
  });
});
