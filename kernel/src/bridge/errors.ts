/**
 * The worker answered a request with an error reply: the Python exception's class, its message
 * and traceback travel with it so a notebook shows what went wrong in the worker.
 */
export class WorkerError extends Error {
  override name = "WorkerError";
  /** The request type that failed (load, generate, ...). */
  readonly request: string;
  /** Python exception class, or a protocol error name. */
  readonly ename: string;
  readonly evalue: string;
  /** Python traceback lines, as the worker formatted them. */
  readonly traceback: readonly string[];

  constructor(request: string, ename: string, evalue: string, traceback: readonly string[]) {
    super(`${request} failed: ${ename}: ${evalue}`);
    this.request = request;
    this.ename = ename;
    this.evalue = evalue;
    this.traceback = traceback;
  }

  /** The Python traceback as one string, for printing. */
  get pythonTraceback(): string {
    return this.traceback.join("\n");
  }

  /**
   * The last line of the exception this one was raised from (Python's `raise ... from` or an
   * exception raised while handling another), e.g. `ConnectError: [Errno -3] Temporary failure in
   * name resolution`; undefined when the traceback shows no earlier exception.
   */
  get pythonCause(): string | undefined {
    return pythonCause(this.traceback, this.evalue);
  }
}

/** Lines Python's traceback module writes between a cause and the exception raised from it. */
const CHAIN_SEPARATORS = [
  "The above exception was the direct cause of the following exception:",
  "During handling of the above exception, another exception occurred:",
];

/**
 * The exception that ends the section just before the last chain separator, as `Type: message`
 * on one line (a message over several lines is joined), with the type's module path dropped.
 * `evalue` is the final exception's message: a cause that only repeats it is left out.
 */
export function pythonCause(traceback: readonly string[], evalue = ""): string | undefined {
  const lines = traceback.flatMap((l) => l.split("\n"));
  let sep = -1;
  for (let i = lines.length - 1; i >= 0; i--) {
    if (CHAIN_SEPARATORS.includes(lines[i].trim())) {
      sep = i;
      break;
    }
  }
  if (sep < 0) return undefined;
  // The exception's lines follow the last frame: they are the unindented ones above the separator.
  const text: string[] = [];
  for (let i = sep - 1; i >= 0; i--) {
    const line = lines[i];
    if (/^\s/.test(line) || line.startsWith("Traceback (most recent call last)") || CHAIN_SEPARATORS.includes(line.trim())) break;
    if (line.trim() !== "") text.unshift(line.trim());
  }
  if (text.length === 0) return undefined;
  const m = /^([\w.]+)(?:: ([\s\S]*))?$/.exec(text.join(" "));
  if (!m) return text.join(" ");
  const name = m[1].slice(m[1].lastIndexOf(".") + 1);
  const message = m[2] ?? "";
  if (message !== "" && message === evalue.replace(/\s*\n\s*/g, " ")) return undefined;
  return message === "" ? name : `${name}: ${message}`;
}

/** The worker process went away while requests were waiting for it. */
export class WorkerExitedError extends Error {
  override name = "WorkerExitedError";
  readonly pid: number;
  readonly log: string;

  constructor(message: string, pid: number, log: string) {
    super(message);
    this.pid = pid;
    this.log = log;
  }
}

/**
 * A model handle used after `unload()` in its notebook. Named as the worker names the same condition
 * (a handle it does not hold), so a notebook sees one error for both.
 */
export class ModelNotLoadedError extends Error {
  override name = "ModelNotLoadedError";
}
