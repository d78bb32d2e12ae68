import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { homedir, tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { endpoint, isPidAlive, readRuntimeFile, removeStaleRuntimeFile, runtimeDir, tailOfFile } from "./runtime";

const dir = mkdtempSync(join(tmpdir(), "qwenbook-runtime-spec-"));
const good = {
  transport: "tcp", ip: "127.0.0.1", router_port: 5555, pub_port: 5556, key: "ab".repeat(32),
  signature_scheme: "hmac-sha256", pid: 4242, protocol_version: "1.0", worker_version: "0.1.0",
  started: "2026-01-01T00:00:00.000Z", python: "/usr/bin/python3", log: "/tmp/w.log",
};

describe("runtimeDir", () => {
  it("prefers QWENBOOK_RUNTIME_DIR, then JUPYTER_RUNTIME_DIR, then Jupyter's default", () => {
    expect(runtimeDir({ QWENBOOK_RUNTIME_DIR: "/a", JUPYTER_RUNTIME_DIR: "/b" })).toBe("/a");
    expect(runtimeDir({ JUPYTER_RUNTIME_DIR: "/b" })).toBe("/b");
    expect(runtimeDir({})).toBe(join(homedir(), ".local", "share", "jupyter", "runtime"));
  });
});

describe("readRuntimeFile", () => {
  it("returns null when there is no file and the info when it is well formed", () => {
    expect(readRuntimeFile(join(dir, "absent.json"))).toBeNull();
    const p = join(dir, "good.json");
    writeFileSync(p, JSON.stringify(good));
    expect(readRuntimeFile(p)).toEqual(good);
  });

  it("names what is wrong with a damaged file", () => {
    const p = join(dir, "bad.json");
    writeFileSync(p, "{not json");
    expect(() => readRuntimeFile(p)).toThrow(/is not JSON/);
    writeFileSync(p, JSON.stringify({ ...good, transport: "udp", key: "" }));
    expect(() => readRuntimeFile(p)).toThrow(/transport "udp" is not supported \(ipc or tcp\).*key is missing/);
    writeFileSync(p, JSON.stringify({ ...good, router_port: "x" }));
    expect(() => readRuntimeFile(p)).toThrow(/router_port is not a positive integer/);
    const { ip: _ip, router_port: _r, pub_port: _p, ...common } = good;
    writeFileSync(p, JSON.stringify({ ...common, transport: "ipc", router_endpoint: "tcp://127.0.0.1:1" }));
    expect(() => readRuntimeFile(p)).toThrow(/router_endpoint is not an ipc:\/\/ endpoint; pub_endpoint is not an ipc:\/\/ endpoint/);
  });

  it("reads an ipc runtime file and gives its endpoints; a tcp one without endpoints gets them from its ports", () => {
    const { ip: _ip, router_port: _r, pub_port: _p, ...common } = good;
    const ipc = { ...common, transport: "ipc", router_endpoint: "ipc:///run/q/qwenbook-worker-router", pub_endpoint: "ipc:///run/q/qwenbook-worker-pub" };
    const p = join(dir, "ipc.json");
    writeFileSync(p, JSON.stringify(ipc));
    const info = readRuntimeFile(p)!;
    expect([endpoint(info, "router"), endpoint(info, "pub")]).toEqual([ipc.router_endpoint, ipc.pub_endpoint]);
    writeFileSync(p, JSON.stringify(good));
    const tcp = readRuntimeFile(p)!;
    expect([endpoint(tcp, "router"), endpoint(tcp, "pub")]).toEqual(["tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"]);
  });

  it("removes a stale file only while it still names the dead pid", () => {
    const p = join(dir, "stale.json");
    writeFileSync(p, JSON.stringify(good));
    removeStaleRuntimeFile(p, 1);
    expect(readRuntimeFile(p)).not.toBeNull();
    removeStaleRuntimeFile(p, good.pid);
    expect(readRuntimeFile(p)).toBeNull();
  });
});

describe("isPidAlive", () => {
  it("is true for this process and false for one that has exited", async () => {
    expect(isPidAlive(process.pid)).toBe(true);
    const child = spawn(process.execPath, ["-e", ""]);
    await new Promise((r) => child.once("exit", r));
    expect(isPidAlive(child.pid!)).toBe(false);
  });

  it("treats a zombie (exited, never reaped) as dead", async () => {
    // The parent forks a child that exits at once and never waits for it, so the child stays a zombie.
    const parent = spawn("python3", ["-c", "import os,sys,time\npid=os.fork()\nif pid==0: os._exit(0)\nprint(pid,flush=True)\ntime.sleep(30)"]);
    try {
      const pid = await new Promise<number>((resolve) => parent.stdout.once("data", (d: Buffer) => resolve(Number(String(d).trim()))));
      const state = (): string => {
        const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
        return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
      };
      while (state() !== "Z") await new Promise((r) => setTimeout(r, 20));
      expect(isPidAlive(pid)).toBe(false);
    } finally {
      parent.kill("SIGKILL");
    }
  });
});

describe("tailOfFile", () => {
  it("returns the last lines, and nothing for a missing file", () => {
    const p = join(dir, "log.txt");
    writeFileSync(p, Array.from({ length: 50 }, (_, i) => `line ${i}`).join("\n") + "\n");
    expect(tailOfFile(p, 3)).toBe("line 47\nline 48\nline 49");
    expect(tailOfFile(join(dir, "nope.txt"))).toBe("");
  });
});
