import Module from "node:module";
import { realpathSync } from "node:fs";
import { isAbsolute, join, relative } from "node:path";

export const PACKAGE_NAME = "qwenbook";

/**
 * Maps `<cwd>/node_modules/qwenbook[/rest]` to `<packageDir>[/rest]`; null for any other path.
 * tslab's type checker resolves imports from the notebook's folder only, so the kernel makes the
 * package appear there, the way tslab fakes `<cwd>/node_modules/tslab` for itself.
 */
export function forwardPath(cwd: string, packageDir: string, path: string): string | null {
  const rel = relative(join(cwd, "node_modules", PACKAGE_NAME), path);
  if (rel.startsWith("..") || isAbsolute(rel)) return null;
  return rel === "" ? packageDir : join(packageDir, rel);
}

/** The parts of TypeScript's `sys` that module resolution reads files through. */
export interface ResolutionSys {
  fileExists(path: string): boolean;
  readFile(path: string, encoding?: string): string | undefined;
  directoryExists?(path: string): boolean;
  realpath?(path: string): string;
}

/**
 * Wraps `sys` (tslab's TypeScript's `ts.sys`, patched before tslab builds its compiler host on
 * top of it) so the package resolves from `cwd`. `realpath` returns the package's real location,
 * so the compiler then resolves the package's own imports (its dependencies) from there.
 */
export function forwardTypeScriptSys(sys: ResolutionSys, cwd: string, packageDir: string): void {
  const fwd = (p: string): string => forwardPath(cwd, packageDir, p) ?? p;
  const { fileExists, readFile, directoryExists, realpath } = sys;
  sys.fileExists = (p) => fileExists.call(sys, fwd(p));
  sys.readFile = (p, encoding) => readFile.call(sys, fwd(p), encoding);
  if (directoryExists) {
    sys.directoryExists = (p) => p === join(cwd, "node_modules") || directoryExists.call(sys, fwd(p));
  }
  sys.realpath = (p) => {
    const forwarded = forwardPath(cwd, packageDir, p);
    if (forwarded !== null) {
      try {
        return realpathSync(forwarded);
      } catch {
        return forwarded;
      }
    }
    return realpath ? realpath.call(sys, p) : p;
  };
}

type ResolveFilename = (request: string, parent: unknown, isMain: boolean, options?: unknown) => string;

/** Makes `require("qwenbook")` (and `qwenbook/...`) load this package from any folder. */
export function hookRequire(packageDir: string): void {
  const M = Module as unknown as { _resolveFilename: ResolveFilename };
  const original = M._resolveFilename;
  M._resolveFilename = function (this: unknown, request, parent, isMain, options) {
    if (request === PACKAGE_NAME || request.startsWith(`${PACKAGE_NAME}/`)) {
      request = packageDir + request.slice(PACKAGE_NAME.length);
    }
    return original.call(this, request, parent, isMain, options);
  };
}
