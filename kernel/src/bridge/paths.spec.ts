import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { resolvePython } from "./paths";

/** A folder that is no Qwenbook checkout, so the checkout's .venv rule cannot apply. */
const noRepo = mkdtempSync(join(tmpdir(), "qwenbook-no-repo-"));

function venvWithPython(): string {
  const venv = mkdtempSync(join(tmpdir(), "qwenbook-venv-"));
  mkdirSync(join(venv, "bin"));
  writeFileSync(join(venv, "bin", "python"), "");
  return venv;
}

describe("resolvePython: the worker's python", () => {
  it("takes QWENBOOK_PYTHON first, then the kernelspec's python", () => {
    const env = { QWENBOOK_PYTHON: "/a/python", QWENBOOK_KERNEL_PYTHON: "/k/python", QWENBOOK_REPO: noRepo };
    expect(resolvePython(env)).toEqual({ command: "/a/python", reason: "QWENBOOK_PYTHON" });
    expect(resolvePython({ ...env, QWENBOOK_PYTHON: undefined }).command).toBe("/k/python");
  });

  it("outside a checkout, takes the active virtualenv's python, else python3 on PATH", () => {
    const venv = venvWithPython();
    expect(resolvePython({ QWENBOOK_REPO: noRepo, VIRTUAL_ENV: venv })).toEqual({
      command: join(venv, "bin", "python"),
      reason: "the active virtualenv (VIRTUAL_ENV)",
    });
    expect(resolvePython({ QWENBOOK_REPO: noRepo, VIRTUAL_ENV: join(noRepo, "gone") }).command).toBe("python3");
    expect(resolvePython({ QWENBOOK_REPO: noRepo }).command).toBe("python3");
  });

  it("in a checkout, takes its .venv before an active virtualenv", () => {
    const repo = venvWithPython();
    mkdirSync(join(repo, ".venv", "bin"), { recursive: true });
    writeFileSync(join(repo, ".venv", "bin", "python"), "");
    expect(resolvePython({ QWENBOOK_REPO: repo, VIRTUAL_ENV: venvWithPython() }).command).toBe(join(repo, ".venv", "bin", "python"));
  });
});
