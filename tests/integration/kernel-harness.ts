// Drives the "Qwen (TypeScript)" kernel through Jupyter's own client (kernel_driver.py) and reads
// back what each cell sent: status, stream text, errors and display messages.
import { spawn } from "node:child_process";
import { join } from "node:path";
import { python, repo } from "./helpers";

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
}

export interface CellCode {
  code: string;
  /** Press the interrupt button once the cell has sent its first output. */
  interrupt_after_output?: boolean;
}

/** Runs the cells in one kernel started from the kernelspec under `prefix`, with `notebookDir` as its folder. */
export function drive(prefix: string, notebookDir: string, code: CellCode[]): Promise<CellResult[]> {
  return new Promise((resolve, reject) => {
    const child = spawn(python, [join(repo, "tests", "integration", "kernel_driver.py"), "qwen-ts", notebookDir, JSON.stringify(code)], {
      env: { ...process.env, JUPYTER_PATH: join(prefix, "share", "jupyter") },
    });
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => (out += d));
    child.stderr.on("data", (d: Buffer) => (err += d));
    child.once("exit", (status) => {
      if (status !== 0) reject(new Error(`kernel_driver.py exited with ${status}:\n${err}`));
      else resolve(JSON.parse(out.trim().split("\n").pop()!) as CellResult[]);
    });
  });
}
