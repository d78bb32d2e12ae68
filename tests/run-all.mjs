#!/usr/bin/env node
// Runs every suite (pytest, install, vitest unit+integration, extension, notebooks, browser), each writing a
// machine-readable report, and ends with the one line CI reads: "N passed, N failed".
// A skipped test counts as failed: nothing may be skipped silently.
import { spawn } from "node:child_process";
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { availableParallelism, tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const repo = join(dirname(fileURLToPath(import.meta.url)), "..");
const reports = join(repo, ".qwenbook", "reports");
rmSync(reports, { recursive: true, force: true });
mkdirSync(reports, { recursive: true });
const venvBin = join(repo, ".venv", "bin");
const flags = process.argv.slice(2).filter((a) => a.startsWith("--"));
const only = process.argv.slice(2).filter((a) => !a.startsWith("--"));
const unknown = flags.filter((f) => f !== "--stress");
if (unknown.length > 0) {
  console.error(`unknown option ${unknown.join(" ")}; usage: npm test [-- [--stress] [suite ...]]`);
  process.exit(2);
}

const baseEnv = {
  ...process.env,
  PATH: `${venvBin}:${join(repo, "node_modules", ".bin")}:${process.env.PATH}`,
  PIP_RETRIES: "0",
  QWENBOOK_TINY_MODEL: process.env.QWENBOOK_TINY_MODEL ?? join(repo, ".qwenbook", "models", "tiny-qwen2"),
  QWENBOOK_TINY_QWEN3: process.env.QWENBOOK_TINY_QWEN3 ?? join(repo, ".qwenbook", "models", "tiny-qwen3"),
  QWENBOOK_PYTHON: join(venvBin, "python"),
  HF_HUB_OFFLINE: "1",
  TOKENIZERS_PARALLELISM: "false",
  PYTHONUNBUFFERED: "1",
  // One compute thread per process: the lanes (and a busy CI host) already keep both cores busy, and
  // PyTorch's OpenMP threads spin-wait for each other when oversubscribed (a 16 s run took 240 s that way).
  OMP_NUM_THREADS: process.env.OMP_NUM_THREADS ?? "1",
  // CPU chat runs on llama.cpp from a q8_0 copy of the weights by default; the suites compare replies with
  // transformers token for token, so they ask for the exact f32 copy (python-bridge/tests/test_llama_cpp_engine.py
  // checks the default).
  QWENBOOK_CPU_GGUF_TYPE: process.env.QWENBOOK_CPU_GGUF_TYPE ?? "f32",
  // int8/int4 layers decode a few rows on the CPU with a kernel torch.compile builds once per process: 15-25 s of
  // CPU even when Inductor's disk cache already holds it (importing Inductor, tracing with symbolic shapes). The
  // workers, servers and notebooks of the suites decode on the dense path instead, which is also what serves
  // every prefill; the kernel's own tests (test_quant.py, test_fast_decode_quant.py) turn it back on.
  QWENBOOK_CPU_QUANT_KERNEL: process.env.QWENBOOK_CPU_QUANT_KERNEL ?? "0",
  // glibc maps every large tensor (a tiny model's logits over the 152k-word vocabulary are hundreds of MB) fresh
  // and the kernel then faults it in 4 KB at a time; with transparent huge pages allowed for malloc (glibc 2.35+,
  // ignored elsewhere) that is 2 MB at a time: pytest's training and generation files took a third less CPU.
  GLIBC_TUNABLES: [process.env.GLIBC_TUNABLES, "glibc.malloc.hugetlb=1"].filter(Boolean).join(":"),
};

function vitest(config, name) {
  const out = join(reports, `${name}.json`);
  return {
    name,
    config,
    cmd: "npx",
    args: ["vitest", "run", "--config", config, "--reporter=default", "--reporter=json", `--outputFile.json=${out}`],
    parse() {
      const r = JSON.parse(readFileSync(out, "utf8"));
      // The slowest files, so every run says where its time went (vitest's own summary gives only the total). A
      // file's startTime leaves out its beforeAll hooks (worker starts, notebook runs); the files run one after
      // another, so a file's time is taken from the previous file's end (the run's start for the first).
      const ended = (r.testResults ?? []).map((f) => ({ name: f.name.replace(`${repo}/`, ""), end: f.endTime }));
      ended.sort((a, b) => a.end - b.end);
      const files = ended.map((f, i) => ({ name: f.name, secs: (f.end - (i === 0 ? r.startTime : ended[i - 1].end)) / 1000 }));
      files.sort((a, b) => b.secs - a.secs);
      console.log(`[${name}] slowest files: ${files.slice(0, 10).map((f) => `${f.name} ${f.secs.toFixed(0)} s`).join(", ")}`);
      return { passed: r.numPassedTests, failed: r.numFailedTests, skipped: r.numPendingTests + r.numTodoTests };
    },
  };
}

// Test files that mostly start processes (Ray's head and workers, torchrun ranks): a pytest of their own in the
// install lane, which otherwise idles after its ~190 s, so the main pytest lane (1,263 s in the last clean-clone
// run, against the Node lane's 1,140 s) is no longer the one every run waits for.
const LAUNCHING = ["test_ray_train.py", "test_fsdp_train.py", "test_bench_dist.py", "test_dist_train.py"]
  .map((f) => `python-bridge/tests/${f}`);

// Long self-contained files run at the end of the install lane: in a run without them there the Python lane took
// its final ~230 s alone (1,540 s in all) while the install lane had ended at ~980 s, one core idle; with the first
// two moved, the lanes ended at 909 s (install), 1,032 s (Node) and 1,100 s (Python).
const TAIL = ["test_gguf.py", "test_bench_train.py", "test_quant_triton.py"].map((f) => `python-bridge/tests/${f}`);

/** A pytest run writing its own JUnit report: over `files`, or over python-bridge/tests without `skip`. */
function pytest(name, { lane = "python", files = null, skip = [] } = {}) {
  const xmlPath = join(reports, `${name}.xml`);
  return {
    name,
    config: "python-bridge/tests", // what must exist for the suite to run
    lane,
    cmd: join(venvBin, "python"),
    // The slowest tests are listed at the end of the log, so every run says where its time went.
    args: ["-m", "pytest", ...(files ?? ["python-bridge/tests", ...skip.map((f) => `--ignore=${f}`)]), "-q",
      "--durations=25", `--junitxml=${xmlPath}`],
    parse() {
      const xml = readFileSync(xmlPath, "utf8");
      const m = xml.match(/<testsuite [^>]*>/);
      const attr = (k) => Number((m?.[0].match(new RegExp(`${k}="(\\d+)"`)) ?? [])[1] ?? 0);
      const total = attr("tests");
      const failed = attr("failures") + attr("errors");
      const skipped = attr("skipped");
      return { passed: total - failed - skipped, failed, skipped };
    },
  };
}

const suites = [
  // The Python suite in its own lane, but for the launching files.
  pytest("pytest", { skip: [...LAUNCHING, ...TAIL] }),
  // The README's install section in a fresh folder (wheels, a new virtualenv, the packed npm package, a notebook
  // on the new kernel): 400-480 s, mostly pip and npm unpacking and writing packages, so it runs in a third lane
  // beside the other two rather than lengthening either.
  { ...vitest("tests/install/vitest.config.ts", "install"), lane: "install" },
  pytest("pytest-launch", { lane: "install", files: LAUNCHING }),
  // The extension's specs and the browser suite (JupyterLab in Chromium) end the install lane; see the lanes below.
  { ...vitest("extension/vitest.config.ts", "extension"), lane: "install" },
  { ...vitest("tests/browser/vitest.config.ts", "browser"), lane: "install" },
  pytest("pytest-tail", { lane: "install", files: TAIL }),
  vitest("tests/vitest.config.ts", "vitest"),
  vitest("tests/notebooks/vitest.config.ts", "notebooks"),
];
const unknownSuites = only.filter((name) => !suites.some((s) => s.name === name));
if (unknownSuites.length > 0) {
  console.error(`no suite named ${unknownSuites.join(", ")}; the suites are ${suites.map((s) => s.name).join(", ")}`);
  process.exit(2);
}
const chosen = suites.filter((s) => only.length === 0 || only.includes(s.name));

// --stress keeps every core busy with a spinning process for the whole run, to prove the suites wait for
// readiness rather than for time (a CI host is often busy). Only for that check; the hogs end with the run.
const hogs = flags.includes("--stress")
  ? Array.from({ length: availableParallelism() }, () => spawn(process.execPath, ["-e", "for (;;) {}"], { stdio: "ignore" }))
  : [];
const endHogs = () => hogs.forEach((h) => h.kill("SIGKILL"));
process.on("exit", endHogs);
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(130));
if (hogs.length > 0) console.log(`[stress] ${hogs.length} spinning processes keep every core busy during the run`);
const started = Date.now();

/** Busy and total CPU ticks of the whole machine (/proc/stat), to report how much of the cores the run used. */
function cpuTicks() {
  try {
    const f = readFileSync("/proc/stat", "utf8").split("\n")[0].trim().split(/\s+/).slice(1).map(Number);
    const idle = f[3] + (f[4] ?? 0);
    const total = f.reduce((a, b) => a + b, 0);
    return { busy: total - idle, total };
  } catch {
    return null; // not Linux
  }
}
const ticksAtStart = cpuTicks();

/** Runs one suite with its output in a log file, printed whole when it ends (the lanes run at once). */
function runSuite(s) {
  if (!existsSync(join(repo, s.config))) return Promise.resolve({ line: `${s.name}: missing (${s.config})`, passed: 0, failed: 1 });
  console.log(`[${s.name}] started`);
  const runtime = mkdtempSync(join(tmpdir(), `qwenbook-${s.name}-`));
  const logFile = join(reports, `${s.name}.log`);
  const log = openSync(logFile, "w");
  const t0 = Date.now();
  const child = spawn(s.cmd, s.args, { cwd: repo, stdio: ["ignore", log, log], env: { ...baseEnv, QWENBOOK_RUNTIME_DIR: runtime } });
  return new Promise((resolve) => {
    const done = (status, error) => {
      closeSync(log);
      const secs = ((Date.now() - t0) / 1000).toFixed(0);
      rmSync(runtime, { recursive: true, force: true });
      console.log(`\n=== ${s.name} (${secs} s) ===\n${readFileSync(logFile, "utf8")}`);
      if (error) console.error(`${s.name} could not start: ${error.message}`);
      let counts;
      try {
        counts = s.parse();
      } catch (e) {
        counts = { passed: 0, failed: 1, skipped: 0 };
        console.error(`${s.name}: no report (${e.message})`);
      }
      if (status !== 0 && counts.failed === 0) counts.failed = 1; // a crash outside any test still fails the run
      if (counts.passed + counts.failed + counts.skipped === 0) counts.failed = 1; // a suite that ran nothing is broken
      resolve({
        line: `${s.name}: ${counts.passed} passed, ${counts.failed} failed, ${counts.skipped} skipped (${secs} s)`,
        passed: counts.passed,
        failed: counts.failed + counts.skipped,
      });
    };
    child.on("error", (e) => done(1, e));
    child.on("exit", (code) => done(code ?? 1));
  });
}

// Three lanes at once, the suites of a lane one after another: the Python suite; the install suite, the
// launching Python tests, the extension's specs and the browser suite; the integration and notebook suites. On two
// cores lanes save time, since much of each is process start-up and waiting on sockets and disks; every test
// already waits for readiness, as it must on a busy CI host. The lanes are balanced by their times on a two-core
// host (about 1,150, 850 and 1,150 s in CI): with the browser suite after the integration and notebook suites,
// that lane ran its last 220 s alone, one core idle.
const lanes = ["python", "install", undefined].map((lane) => chosen.filter((s) => s.lane === lane)).filter((l) => l.length > 0);
const results = (await Promise.all(lanes.map(async (lane) => {
  const out = [];
  for (const s of lane) out.push(await runSuite(s));
  return out;
}))).flat();
const summary = results.map((r) => r.line);
const passed = results.reduce((n, r) => n + r.passed, 0);
const failed = results.reduce((n, r) => n + r.failed, 0);
console.log("\n" + summary.join("\n"));
const ticksAtEnd = cpuTicks();
// How busy the cores were over the run (everything on the machine, not only these suites): near 100% means more
// lanes would not help; well below means the lanes spend much of their time waiting.
const busy = ticksAtStart && ticksAtEnd ? ` · CPU ${((100 * (ticksAtEnd.busy - ticksAtStart.busy)) / (ticksAtEnd.total - ticksAtStart.total)).toFixed(0)}% busy on ${availableParallelism()} cores` : "";
console.log(`all suites: ${((Date.now() - started) / 1000).toFixed(0)} s${busy}${hogs.length ? ` with ${hogs.length} cores kept busy` : ""}`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
