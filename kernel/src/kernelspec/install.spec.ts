import { chmodSync, mkdirSync, mkdtempSync, readFileSync, realpathSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { isAbsolute, join } from "node:path";
import { describe, expect, it } from "vitest";
import { installKernelspec, jupyterDataDir, kernelPython, kernelSpec } from "./install";

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

  it("records the worker's python in the kernel's environment", () => {
    const spec = kernelSpec("/usr/bin/node", "/pkg/launch.js", "/venv/bin/python");
    expect(spec.env).toEqual({ QWENBOOK_KERNEL_PYTHON: "/venv/bin/python" });
  });

  it("without a prefix, writes into the user's Jupyter data folder ($JUPYTER_DATA_DIR first)", () => {
    const data = join(mkdtempSync(join(tmpdir(), "qwenbook-data-")), "jupyter");
    const r = installKernelspec(undefined, kernelSpec("/usr/bin/node", "/pkg/launch.js"), { JUPYTER_DATA_DIR: data });
    expect(r).toEqual({ dir: join(data, "kernels", "qwen-ts"), changed: true });
    expect(jupyterDataDir({ HOME: "/home/u" }, "linux")).toBe("/home/u/.local/share/jupyter");
    expect(jupyterDataDir({ HOME: "/home/u", XDG_DATA_HOME: "/x" }, "linux")).toBe("/x/jupyter");
    expect(jupyterDataDir({ HOME: "/Users/u" }, "darwin")).toBe("/Users/u/Library/Jupyter");
  });

  it("refuses a prefix that does not exist", () => {
    expect(() => installKernelspec("/no/such/venv")).toThrow(/does not exist.*--prefix/);
  });
});

describe("kernelPython", () => {
  const dir = mkdtempSync(join(tmpdir(), "qwenbook-kpy-"));
  /** A stand-in python that answers the probe as a python with (status 0) or without (status 3) the package. */
  function fake(name: string, status: number): string {
    const path = join(dir, name);
    writeFileSync(path, `#!/bin/sh\n[ ${status} = 0 ] && echo ${path}\nexit ${status}\n`);
    chmodSync(path, 0o755);
    return path;
  }

  it("takes --python, then QWENBOOK_PYTHON, then the prefix's python", () => {
    const given = fake("given", 0);
    const fromEnv = fake("env", 0);
    const prefix = join(dir, "venv");
    mkdirSync(join(prefix, "bin"), { recursive: true });
    writeFileSync(join(prefix, "bin", "python"), `#!/bin/sh\necho ${prefix}/bin/python\n`);
    chmodSync(join(prefix, "bin", "python"), 0o755);
    expect(kernelPython(given, prefix, { QWENBOOK_PYTHON: fromEnv })).toBe(given);
    expect(kernelPython(undefined, prefix, { QWENBOOK_PYTHON: fromEnv })).toBe(fromEnv);
    expect(kernelPython(undefined, prefix, {})).toBe(join(prefix, "bin", "python"));
  });

  it("gives a real python with qwenbook_bridge as its absolute path", () => {
    const checkout = join(__dirname, "..", "..", "..", ".venv", "bin", "python");
    const python = process.env.QWENBOOK_PYTHON ?? checkout;
    const found = kernelPython(python, undefined, {});
    expect(isAbsolute(found)).toBe(true);
    expect(realpathSync(found)).toBe(realpathSync(python));
  });

  it("refuses a python without qwenbook_bridge, saying how to fix it", () => {
    expect(() => kernelPython(fake("bare", 3), undefined, {})).toThrow(
      /^The worker's python .*bare \(chosen from --python\) has no qwenbook_bridge package\. .*pip install qwenbook-bridge.*--python/,
    );
    expect(() => kernelPython(join(dir, "missing"), undefined, {})).toThrow(/^Could not run the worker's python .*missing/);
  });
});
