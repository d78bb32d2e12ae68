// Drives the "Qwen (TypeScript)" kernel through Jupyter's own client (kernel_driver.py) and reads
// back what each cell sent: status, stream text, errors and display messages.
import { join } from "node:path";
import { repo, runPythonJson } from "./helpers";

export interface Display {
  msg_type: string;
  data: Record<string, unknown>;
  display_id: string | null;
}

export interface CellResult {
  status: string;
  stream: string;
  errors: { ename: string; evalue: string }[];
  displays: Display[];
  /** For a batch: each request's result, in the order sent. */
  batch?: CellResult[];
  /** For a batch: [request index, execution_state] of every status message, in arrival order. */
  statuses?: [number, string][];
}

export type CellCode =
  | {
      code: string;
      /** Press the interrupt button once the cell has sent its first output. */
      interrupt_after_output?: boolean;
      /** Send it as soon as the previous (failed) cell has its reply, not half a second later. */
      right_after_error?: boolean;
    }
  /** Requests sent together, as Run All sends them. */
  | { batch: string[] };

/** Runs the cells in one kernel started from the kernelspec under `prefix`, with `notebookDir` as its folder. */
export function drive(prefix: string, notebookDir: string, code: CellCode[]): Promise<CellResult[]> {
  return runPythonJson<CellResult[]>(
    [join(repo, "tests", "integration", "kernel_driver.py"), "qwen-ts", notebookDir, JSON.stringify(code)],
    { JUPYTER_PATH: join(prefix, "share", "jupyter") },
  );
}
