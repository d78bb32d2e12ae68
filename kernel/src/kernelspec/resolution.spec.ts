import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, realpathSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { describe, expect, it } from "vitest";
import { forwardPath, forwardTypeScriptSys, type ResolutionSys } from "./resolution";

const root = realpathSync(mkdtempSync(join(tmpdir(), "qwenbook-resolution-")));
const notebookDir = join(root, "notebooks", "deep");
const pkg = join(root, "somewhere", "qwenbook");
mkdirSync(notebookDir, { recursive: true });
mkdirSync(join(pkg, "dist"), { recursive: true });
writeFileSync(join(pkg, "package.json"), JSON.stringify({ name: "qwenbook", main: "dist/index.js", types: "dist/index.d.ts" }));
writeFileSync(join(pkg, "dist", "index.d.ts"), "export declare const answer: 42;\n");
writeFileSync(join(pkg, "dist", "index.js"), "exports.answer = 42;\n");

describe("forwardPath", () => {
  it("maps the package inside the notebook folder's node_modules, and nothing else", () => {
    expect(forwardPath("/nb", "/pkg", "/nb/node_modules/qwenbook")).toBe("/pkg");
    expect(forwardPath("/nb", "/pkg", "/nb/node_modules/qwenbook/dist/index.d.ts")).toBe("/pkg/dist/index.d.ts");
    expect(forwardPath("/nb", "/pkg", "/nb/node_modules/qwenbook-other/x")).toBeNull();
    expect(forwardPath("/nb", "/pkg", "/nb/node_modules/tslab/x")).toBeNull();
    expect(forwardPath("/nb", "/pkg", "/elsewhere/node_modules/qwenbook")).toBeNull();
  });
});

describe("forwardTypeScriptSys", () => {
  it("lets tslab's TypeScript resolve `qwenbook` from a folder with no node_modules, to the real package", () => {
    // The same TypeScript build tslab uses, with its Node10 resolution.
    const tslabRequire = createRequire(require.resolve("tslab/package.json"));
    const ts = tslabRequire("@tslab/typescript-for-tslab") as typeof import("typescript");
    const sys: ResolutionSys = Object.create(ts.sys) as ResolutionSys;
    const resolve = () =>
      ts.resolveModuleName("qwenbook", join(notebookDir, "__tslab__.ts"), { moduleResolution: ts.ModuleResolutionKind.Node10 }, sys as typeof ts.sys)
        .resolvedModule;
    expect(resolve()).toBeUndefined();
    forwardTypeScriptSys(sys, notebookDir, pkg);
    expect(resolve()?.resolvedFileName).toBe(join(pkg, "dist", "index.d.ts"));
  });
});

describe("hookRequire", () => {
  it("makes require('qwenbook') load the package from any folder", () => {
    // Run in a child so the hook does not leak into other specs; it loads the built helper.
    const built = join(dirname(__filename), "..", "..", "dist", "kernelspec", "resolution.js");
    const code =
      `require(${JSON.stringify(built)}).hookRequire(${JSON.stringify(pkg)});` +
      `const m = require("module").createRequire(${JSON.stringify(join(notebookDir, "x.js"))})("qwenbook");` +
      `process.stdout.write(String(m.answer));`;
    const r = spawnSync(process.execPath, ["-e", code], { cwd: notebookDir, encoding: "utf8" });
    expect(r.stderr).toBe("");
    expect(r.stdout).toBe("42");
  });
});
