import { spawnSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { repo } from "./notebook-runner";

const read = (p: string): string => readFileSync(join(repo, p), "utf8");

describe("binder/ matches the setup that npm start runs", () => {
  it("postBuild runs the same setup script", () => {
    const post = read("binder/postBuild");
    expect(post).toMatch(/^node kernel\/scripts\/setup\.mjs\b/m);
    expect(existsSync(join(repo, "kernel/scripts/setup.mjs"))).toBe(true);
  });

  it("environment.yml brings a Python the worker accepts and the Node the kernel is tested on", () => {
    const env = read("binder/environment.yml");
    const py = env.match(/python=(\d+)\.(\d+)/);
    const need = read("python-bridge/pyproject.toml").match(/requires-python = ">=(\d+)\.(\d+)"/);
    expect(py && need).toBeTruthy();
    expect(Number(py![1]) * 100 + Number(py![2])).toBeGreaterThanOrEqual(Number(need![1]) * 100 + Number(need![2]));
    expect(env).toMatch(new RegExp(`nodejs=${process.versions.node.split(".")[0]}\\b`));
  });

  it("start exposes the venv's kernelspec and extension and defaults to a small real model", () => {
    const r = spawnSync(join(repo, "binder/start"), ["env"], { encoding: "utf8", env: { PATH: process.env.PATH ?? "" } });
    expect(r.status, r.stderr).toBe(0);
    const vars = Object.fromEntries(r.stdout.split("\n").filter((l) => l.includes("=")).map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]));
    expect(vars.QWENBOOK_MODEL).toBe("Qwen/Qwen2.5-0.5B-Instruct");
    const data = vars.JUPYTER_PATH.split(":")[0];
    expect(data).toBe(join(repo, ".venv/share/jupyter"));
    // What setup installed is what Binder's Jupyter will find there.
    const spec = JSON.parse(readFileSync(join(data, "kernels/qwen-ts/kernel.json"), "utf8"));
    expect(spec.display_name).toBe("Qwen (TypeScript)");
    expect(existsSync(join(data, "labextensions/qwenbook-extension/package.json"))).toBe(true);
  });
});
