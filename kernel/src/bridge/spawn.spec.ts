import { chmodSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { isPidAlive } from "./runtime";
import { ensureWorker, spawnWorker, workerEnv } from "./spawn";

const dir = mkdtempSync(join(tmpdir(), "qwenbook-spawn-spec-"));
const started: number[] = [];
afterAll(() => {
  for (const pid of started) if (isPidAlive(pid)) process.kill(pid, "SIGKILL");
});

async function failure(p: Promise<unknown>): Promise<Error> {
  const outcome = await p.then(
    () => new Error("expected a rejection"),
    (e: unknown) => e as Error,
  );
  if (outcome.message === "expected a rejection") throw outcome;
  return outcome;
}

/** A stand-in for python: a shell script that gets the worker's command line. */
function fakePython(name: string, body: string): string {
  const path = join(dir, name);
  writeFileSync(path, `#!/bin/sh\n# args: -m qwenbook_bridge.worker --runtime-file F --log L\nrf="$4"\n${body}\n`);
  chmodSync(path, 0o755);
  return path;
}

// Writes a runtime file naming itself, then stays alive like a worker would.
const goodWorker = (counter: string) =>
  fakePython(
    "good",
    `echo started >> ${counter}\n` +
      `printf '{"transport":"tcp","ip":"127.0.0.1","router_port":1,"pub_port":2,"key":"k","signature_scheme":"hmac-sha256",` +
      `"pid":%s,"protocol_version":"1.0","worker_version":"t","started":"","python":"sh","log":"l"}' $$ > "$rf.tmp"\n` +
      `mv "$rf.tmp" "$rf"\nexec sleep 30`,
  );

describe("spawnWorker", () => {
  it("says which python could not be run and how to fix it", async () => {
    await expect(spawnWorker({ runtimeFile: join(dir, "a", "rt.json"), python: join(dir, "no-such-python") })).rejects.toThrow(
      /Could not run the worker's python ".*no-such-python".*QWENBOOK_PYTHON/s,
    );
  });

  it("quotes the log when the worker exits during start-up", async () => {
    const python = fakePython("crash", 'echo "ImportError: libcudart.so.12: cannot open shared object file" >&2\nexit 3');
    const err = await failure(spawnWorker({ runtimeFile: join(dir, "b", "rt.json"), python }));
    expect(err.message).toMatch(/exited during start-up \(exit code 3;.*\nThe end of its log \(.*qwenbook-worker\.log\):\n/s);
    expect(err.message).toContain("ImportError: libcudart.so.12");
  });

  it("says how to fix a python that lacks qwenbook_bridge", async () => {
    const python = fakePython("bare", "echo \"/usr/bin/python3: Error while finding module specification for 'qwenbook_bridge.worker' " +
      "(ModuleNotFoundError: No module named 'qwenbook_bridge')\" >&2\nexit 1");
    const err = await failure(spawnWorker({ runtimeFile: join(dir, "b2", "rt.json"), python }));
    expect(err.message).toMatch(/^The worker's python .*bare \(chosen from an explicit python\) has no qwenbook_bridge package\. /);
    expect(err.message).toMatch(/pip install qwenbook-bridge.*QWENBOOK_PYTHON/);
  });

  it("gives up after the timeout with the log's end, leaving the slow worker be", async () => {
    const python = fakePython("slow", 'echo "importing torch"\nexec sleep 30');
    const err = await failure(spawnWorker({ runtimeFile: join(dir, "c", "rt.json"), python, timeoutMs: 300 }));
    const pid = Number(/pid (\d+)/.exec(err.message)?.[1]);
    started.push(pid);
    expect(err.message).toMatch(/did not write .*rt\.json within 0\.3 s; it is still running.*importing torch/s);
    expect(isPidAlive(pid)).toBe(true);
  });
});

describe("spawnWorker's environment", () => {
  it.runIf(process.platform === "linux")("starts the worker with huge pages added to the caller's GLIBC_TUNABLES", async () => {
    const seen = join(dir, "tunables.txt");
    const python = fakePython(
      "env",
      `printf '%s' "$GLIBC_TUNABLES" > ${seen}\n` +
        `printf '{"transport":"tcp","ip":"127.0.0.1","router_port":1,"pub_port":2,"key":"k","signature_scheme":"hmac-sha256",` +
        `"pid":%s,"protocol_version":"1.0","worker_version":"t","started":"","python":"sh","log":"l"}' $$ > "$rf.tmp"\n` +
        `mv "$rf.tmp" "$rf"\nexec sleep 30`,
    );
    const env = { ...process.env, GLIBC_TUNABLES: "glibc.malloc.arena_max=4" };
    const info = await spawnWorker({ runtimeFile: join(dir, "g", "rt.json"), python, env });
    started.push(info.pid);
    expect(readFileSync(seen, "utf8")).toBe("glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1");
  });
});

describe("ensureWorker", () => {
  it("starts one worker for concurrent callers and attaches to it afterwards", async () => {
    const counter = join(dir, "starts.txt");
    const python = goodWorker(counter);
    const runtimeFile = join(dir, "d", "rt.json");
    const [a, b] = await Promise.all([ensureWorker({ runtimeFile, python }), ensureWorker({ runtimeFile, python })]);
    started.push(a.pid);
    expect(b.pid).toBe(a.pid);
    expect((await ensureWorker({ runtimeFile, python })).pid).toBe(a.pid);
    expect(readFileSync(counter, "utf8")).toBe("started\n");
  });

  it("replaces a runtime file left by a dead worker", async () => {
    const runtimeFile = join(dir, "e", "rt.json");
    const counter = join(dir, "starts-e.txt");
    const first = await ensureWorker({ runtimeFile, python: goodWorker(counter) });
    process.kill(first.pid, "SIGKILL");
    while (isPidAlive(first.pid)) await new Promise((r) => setTimeout(r, 10));
    const second = await ensureWorker({ runtimeFile, python: goodWorker(counter) });
    started.push(second.pid);
    expect(second.pid).not.toBe(first.pid);
    expect(readFileSync(counter, "utf8")).toBe("started\nstarted\n");
  });
});

describe("workerEnv", () => {
  it("lets the worker's malloc use huge pages on Linux, after the caller's tunables, unless the caller set them", () => {
    expect(workerEnv({}, "linux").GLIBC_TUNABLES).toBe("glibc.malloc.hugetlb=1");
    expect(workerEnv({ GLIBC_TUNABLES: "glibc.malloc.arena_max=2" }, "linux").GLIBC_TUNABLES).toBe(
      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
    );
    expect(workerEnv({ GLIBC_TUNABLES: "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2" }, "linux").GLIBC_TUNABLES).toBe(
      "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2",
    );
    expect(workerEnv({}, "darwin").GLIBC_TUNABLES).toBeUndefined();
  });

  it("tells the worker where this package's llama.cpp libraries are, unless the caller did", () => {
    const env = workerEnv({ PATH: "/bin" });
    expect(env.PYTHONUNBUFFERED).toBe("1");
    // This package depends on node-llama-cpp's prebuilt binaries for the platform it is installed on.
    expect(env.QWENBOOK_LLAMA_CPP_LIB).toMatch(/@node-llama-cpp\/[\w-]+\/bins\//);
    expect(readFileSync(join(env.QWENBOOK_LLAMA_CPP_LIB ?? "", "_nlcBuildMetadata.json"), "utf8")).toContain("llamaCpp");
    expect(workerEnv({ QWENBOOK_LLAMA_CPP_LIB: "/opt/llama" }).QWENBOOK_LLAMA_CPP_LIB).toBe("/opt/llama");
  });
});
