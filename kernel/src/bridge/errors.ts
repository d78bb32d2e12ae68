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
