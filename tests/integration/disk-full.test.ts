// A disk that fills up during an export, through a real worker: the notebook gets one readable line naming the
// target, roughly what it needed and what is free; the earlier file stays as it was and nothing hidden is left.
// The full disk is injected into the worker by tests/integration/disk-full/sitecustomize.py (on PYTHONPATH for
// this file's worker only), switched on by a flag file.
import { createHash } from "node:crypto";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Qwen, WorkerError, type Model } from "../../kernel/src/index";
import { errorInfo } from "../../kernel/src/display/error-info";
import { privateRuntimeDir, recordingSink, repo, tinyModel } from "./helpers";

const scratch = mkdtempSync(join(tmpdir(), "qwenbook-disk-full-"));
const flag = join(scratch, "disk-is-full");
const startDir = process.cwd();
let qwen: Qwen;
let model: Model;

function sha(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

beforeAll(async () => {
  privateRuntimeDir("disk-full");
  const injector = join(repo, "tests", "integration", "disk-full");
  process.env.PYTHONPATH = [injector, process.env.PYTHONPATH].filter(Boolean).join(":");
  process.env.QWENBOOK_TEST_DISK_FULL_FLAG = flag;
  process.chdir(scratch);
  qwen = new Qwen({ sink: recordingSink() });
  model = await qwen.load(tinyModel(), { dtype: "fp32", device: "cpu", quiet: true });
});

afterAll(async () => {
  await qwen?.shutdown();
  process.chdir(startDir);
  delete process.env.QWENBOOK_TEST_DISK_FULL_FLAG;
  rmSync(scratch, { recursive: true, force: true });
});

describe("a full disk while exporting", () => {
  it("fails with one line naming the path and the free space, and keeps the earlier file", async () => {
    // Without the Ollama Modelfile: "out" then holds the GGUF file alone.
    await model.export("out/model.gguf", { type: "f16", modelfile: false, quiet: true });
    const before = sha("out/model.gguf");

    writeFileSync(flag, "");
    const error = await model.export("out/model.gguf", { type: "f16", modelfile: false, overwrite: true, quiet: true }).then(
      () => null,
      (e: unknown) => e,
    );
    rmSync(flag);

    expect(error).toBeInstanceOf(WorkerError);
    const e = error as WorkerError;
    expect(e.ename).toBe("InsufficientDiskSpaceError");
    const target = join(scratch, "out", "model.gguf");
    const line = new RegExp(
      `^No space left writing ${target.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")} ` +
        String.raw`\(needs ~\d+(\.\d+)? (GB|MB|kB), \d+(\.\d+)? (GB|MB|kB|B) free on /[^)]*\): free space or choose another path\.`,
    );
    expect(e.evalue).toMatch(line);
    expect(e.message).toBe(`export failed: InsufficientDiskSpaceError: ${e.evalue}`);
    const shown = errorInfo(e);
    expect(shown.name).toBe("InsufficientDiskSpaceError");
    expect(shown.message).toBe(e.evalue);
    expect(shown.message).not.toContain("\n");

    expect(sha("out/model.gguf")).toBe(before);
    expect(readdirSync("out")).toEqual(["model.gguf"]);

    // With room again the same export goes through.
    const report = await model.export("out/model.gguf", { type: "f16", modelfile: false, overwrite: true, quiet: true });
    expect(report.path).toBe(target);
    expect(readdirSync("out")).toEqual(["model.gguf"]);
  });
});
