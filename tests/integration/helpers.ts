// Shared fixtures for the integration suite: paths, the tiny model, a private runtime dir per file,
// the venv's python, and a sink that records what would have been printed into a cell.
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, realpathSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { inject } from "vitest";
import type { DisplaySink } from "../../kernel/src/display/sink";

export const repo = realpathSync(join(new URL(".", import.meta.url).pathname, "..", ".."));
export const kernelDir = join(repo, "kernel");
export const cli = join(kernelDir, "dist", "cli", "main.js");
export const python = process.env.QWENBOOK_PYTHON ?? join(repo, ".venv", "bin", "python");

export function tinyModel(): string {
  return inject("tinyModel");
}

/** The tiny random Qwen3 (`npx qwenbook tiny-model --arch qwen3`): Qwen3's own template, q/k norms. */
export function tinyQwen3Model(): string {
  return inject("tinyQwen3Model");
}

/**
 * A fresh runtime dir for this test file, set as QWENBOOK_RUNTIME_DIR so that every worker this
 * process (and its children) starts or finds is this file's own.
 */
export function privateRuntimeDir(name: string): string {
  const dir = mkdtempSync(join(tmpdir(), `qwenbook-it-${name}-`));
  process.env.QWENBOOK_RUNTIME_DIR = dir;
  process.env.QWENBOOK_PYTHON = python;
  // A hub lookup must fail fast here (no network), not wait on retries.
  process.env.HF_HUB_OFFLINE = "1";
  return dir;
}

export type ReferenceJob =
  | { kind: "greedy"; messages: { role: string; content: string }[]; max_tokens: number }
  | { kind: "conversation"; system: string; turns: string[]; max_tokens: number };

export interface GreedyReference {
  engine_text: string;
  engine_ids: number[];
  hf_ids: number[];
  prompt_tokens: number;
}

export interface ConversationReference {
  replies: string[];
  prompt_tokens: number[];
}

/**
 * Runs greedy generations in-process in Python (the engine and plain HF generate) for the same
 * inputs; asynchronous, so it can overlap the worker's start-up.
 */
export function pythonReference(jobs: ReferenceJob[]): Promise<unknown[]> {
  return runPythonJson([join(repo, "tests", "integration", "reference.py"), tinyModel(), JSON.stringify(jobs)], {
    OMP_NUM_THREADS: "1",
  });
}

/** Runs the venv's Python with `args` and resolves to the JSON on the last line it printed. */
export function runPythonJson<T = unknown[]>(args: string[], env: Record<string, string> = {}): Promise<T> {
  return new Promise((resolve, reject) => {
    const child = spawn(python, args, { env: { ...process.env, ...env } });
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => (out += d));
    child.stderr.on("data", (d: Buffer) => (err += d));
    child.once("error", reject);
    child.once("exit", (code) => {
      if (code !== 0) reject(new Error(`python ${args[0]} failed (exit ${code}):\n${err}`));
      else resolve(JSON.parse(out.trim().split("\n").pop()!) as T);
    });
  });
}

/**
 * A Python process that answers requests for as long as a test file needs it: each request is a line of JSON on
 * its stdin, each reply a line `{"ok": value}` or `{"error": text}` on its stdout, in order. For checks that would
 * otherwise start an interpreter each (torch and transformers alone are ~4 s of CPU to import).
 */
export class PythonLines {
  private readonly child;
  private buffered = "";
  private stderr = "";
  private readonly waiting: { resolve: (v: unknown) => void; reject: (e: Error) => void }[] = [];
  constructor(args: string[], env: Record<string, string> = {}) {
    this.child = spawn(python, args, { env: { ...process.env, ...env }, stdio: ["pipe", "pipe", "pipe"] });
    this.child.stdout.on("data", (d: Buffer) => {
      this.buffered += d.toString();
      for (let nl = this.buffered.indexOf("\n"); nl >= 0; nl = this.buffered.indexOf("\n")) {
        const reply = JSON.parse(this.buffered.slice(0, nl)) as { ok?: unknown; error?: string };
        this.buffered = this.buffered.slice(nl + 1);
        const next = this.waiting.shift();
        if (reply.error !== undefined) next?.reject(new Error(`python ${args[0]}: ${reply.error}`));
        else next?.resolve(reply.ok);
      }
    });
    this.child.stderr.on("data", (d: Buffer) => (this.stderr = (this.stderr + d.toString()).slice(-5000)));
    this.child.on("close", (status) => {
      for (const w of this.waiting.splice(0)) w.reject(new Error(`python ${args[0]} exited (${status}):\n${this.stderr}`));
    });
  }
  ask<T>(request: unknown): Promise<T> {
    return new Promise((resolve, reject) => {
      this.waiting.push({ resolve: resolve as (v: unknown) => void, reject });
      this.child.stdin.write(`${JSON.stringify(request)}\n`);
    });
  }
  /** Ends its input: the process exits once it has answered what it was asked. */
  close(): void {
    this.child.stdin.end();
  }
}

/** Runs the CLI with this process's environment. */
export function runCli(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [cli, ...args], { encoding: "utf8", env: process.env, timeout: 120_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** A display sink that keeps what it was given. */
export function recordingSink(): DisplaySink & { out: string[] } {
  const out: string[] = [];
  return { out, text: (t) => void out.push(t), display: () => undefined };
}

/**
 * The tiny Qwen2 trained to call a calculator (python-bridge/tests/tool_model.py), built beside the tiny model
 * or found there (its folder is keyed by the recipe), so tests see a model that really emits tool calls.
 */
export function toolModel(): Promise<string> {
  // Asynchronous: a build takes up to a minute on a busy machine, and a test worker blocked that long misses
  // vitest's own calls ("Timeout calling onTaskUpdate"), which fails the run.
  const script = join(repo, "python-bridge", "tests", "tool_model.py");
  return new Promise((resolve, reject) => {
    const child = spawn(python, [script, dirname(tinyModel())], {
      env: { ...process.env, QWENBOOK_TINY_MODEL: tinyModel(), OMP_NUM_THREADS: "1" },
    });
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => (out += d));
    child.stderr.on("data", (d: Buffer) => (err = (err + d).slice(-5000)));
    child.once("error", reject);
    child.once("close", (code) => {
      if (code === 0) resolve(out.trim().split("\n").pop()!);
      else reject(new Error(`tool_model.py failed (exit ${code}):\n${err}`));
    });
  });
}
