import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { installKernelspec, kernelSpec } from "./install";

describe("installKernelspec", () => {
  it("writes kernel.json under <prefix>/share/jupyter/kernels/qwen-ts, once", () => {
    const prefix = mkdtempSync(join(tmpdir(), "qwenbook-venv-"));
    const spec = kernelSpec("/usr/bin/node", "/pkg/dist/kernelspec/launch.js");
    const first = installKernelspec(prefix, spec);
    expect(first).toEqual({ dir: join(prefix, "share", "jupyter", "kernels", "qwen-ts"), changed: true });
    expect(JSON.parse(readFileSync(join(first.dir, "kernel.json"), "utf8"))).toEqual({
      argv: ["/usr/bin/node", "/pkg/dist/kernelspec/launch.js", "--config-path", "{connection_file}"],
      display_name: "Qwen (TypeScript)",
      language: "typescript",
      interrupt_mode: "signal",
      metadata: { debugger: false },
    });
    expect(installKernelspec(prefix, spec).changed).toBe(false);
    expect(installKernelspec(prefix, kernelSpec("/other/node", "/pkg/dist/kernelspec/launch.js")).changed).toBe(true);
  });

  it("refuses a prefix that does not exist", () => {
    expect(() => installKernelspec("/no/such/venv")).toThrow(/does not exist.*--prefix/);
  });
});
