import { describe, expect, it } from "vitest";
import { pythonCause, WorkerError } from "./errors";

// As the worker sends them: traceback.format_exception(...) split into lines.
const CHAIN = [
  "Traceback (most recent call last):",
  '  File "/tmp/x.py", line 5, in f',
  '    raise ConnectionError("[Errno -3] Temporary failure in name resolution")',
  "ConnectionError: [Errno -3] Temporary failure in name resolution",
  "",
  "The above exception was the direct cause of the following exception:",
  "",
  "Traceback (most recent call last):",
  '  File "/tmp/x.py", line 10, in <module>',
  "    f()",
  '  File "/tmp/x.py", line 7, in f',
  '    raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub\\nand we cannot find it in the cache") from e',
  "huggingface_hub.errors.LocalEntryNotFoundError: An error happened while trying to locate the file on the Hub",
  "and we cannot find it in the cache",
  "",
  "The above exception was the direct cause of the following exception:",
  "",
  "Traceback (most recent call last):",
  '  File "/tmp/x.py", line 12, in <module>',
  "    raise OSError(\"We couldn't connect to 'https://huggingface.co' to load the files\") from e",
  "OSError: We couldn't connect to 'https://huggingface.co' to load the files",
];

describe("pythonCause", () => {
  it("is the exception the final one was raised from, on one line, without its module path", () => {
    expect(pythonCause(CHAIN, "We couldn't connect to 'https://huggingface.co' to load the files")).toBe(
      "LocalEntryNotFoundError: An error happened while trying to locate the file on the Hub and we cannot find it in the cache",
    );
    expect(pythonCause(CHAIN.slice(0, 14))).toBe("ConnectionError: [Errno -3] Temporary failure in name resolution");
  });

  it("is undefined without a chained exception, or when the cause only repeats the message", () => {
    expect(pythonCause(CHAIN.slice(17))).toBeUndefined();
    expect(pythonCause([])).toBeUndefined();
    const repeated = ["ValueError: bad dtype", "", "During handling of the above exception, another exception occurred:", "", "Traceback (most recent call last):", "TypeError: bad dtype"];
    expect(pythonCause(repeated, "bad dtype")).toBeUndefined();
    expect(pythonCause(repeated, "other")).toBe("ValueError: bad dtype");
  });

  it("is what WorkerError.pythonCause reports", () => {
    const e = new WorkerError("load", "OSError", "We couldn't connect to 'https://huggingface.co' to load the files", CHAIN);
    expect(e.pythonCause).toMatch(/^LocalEntryNotFoundError: /);
    expect(e.message).toBe("load failed: OSError: We couldn't connect to 'https://huggingface.co' to load the files");
  });
});
