import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { repoDir } from "./paths";
import { createSigner, decodeMessage, DELIMITER, encodeMessage, makeHeader, WireError } from "./wire";

const KEY = "6b1f3c0a9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b";

function python(): string {
  const venv = join(repoDir() ?? "", ".venv", "bin", "python");
  return process.env.QWENBOOK_PYTHON ?? (existsSync(venv) ? venv : "python3");
}

describe("signing", () => {
  it("matches Python's hmac over the same frames, with the hex key's ASCII as the key", () => {
    const parts = ['{"msg_id":"a","msg_type":"hello"}', "{}", "{}", '{"text":"你好"}'].map((s) => Buffer.from(s, "utf8"));
    const script =
      "import hmac, hashlib, sys\n" +
      "key, *parts = sys.argv[1:]\n" +
      "h = hmac.new(key.encode('ascii'), digestmod=hashlib.sha256)\n" +
      "for p in parts: h.update(p.encode('utf-8'))\n" +
      "print(h.hexdigest())\n";
    const r = spawnSync(python(), ["-c", script, KEY, ...parts.map((p) => p.toString("utf8"))], { encoding: "utf8" });
    expect(r.status, r.stderr).toBe(0);
    expect(createSigner(KEY).sign(parts)).toBe(r.stdout.trim());
  });

  it("verifies its own signature and rejects another key's or a changed frame", () => {
    const parts = [Buffer.from("a"), Buffer.from("b")];
    const s = createSigner(KEY);
    const sig = s.sign(parts);
    expect(sig).toMatch(/^[0-9a-f]{64}$/);
    expect(s.verify(sig, parts)).toBe(true);
    expect(createSigner("0".repeat(64)).verify(sig, parts)).toBe(false);
    expect(s.verify(sig, [Buffer.from("a"), Buffer.from("c")])).toBe(false);
    expect(s.verify(sig.slice(0, 10), parts)).toBe(false);
  });

  it("round-trips with the worker's own protocol module in both directions", () => {
    const signer = createSigner(KEY);
    const request = makeHeader("generate", "ts-session");
    const ours = encodeMessage(signer, { header: request, parentHeader: {}, metadata: {}, content: { prompt: "你好" } });
    const script =
      "import base64, json, sys\n" +
      "from qwenbook_bridge.protocol import Signer, make_message, parse, serialize\n" +
      "signer = Signer(sys.argv[1])\n" +
      "req = parse([base64.b64decode(f) for f in json.loads(sys.argv[2])], signer)\n" +
      "reply = make_message('generate_reply', {'echo': req.content['prompt']}, 'py', parent=req)\n" +
      "print(json.dumps([base64.b64encode(f).decode() for f in serialize(reply, signer)]))\n";
    const r = spawnSync(python(), ["-c", script, KEY, JSON.stringify(ours.map((f) => f.toString("base64")))], { encoding: "utf8" });
    expect(r.status, r.stderr).toBe(0);
    const frames = (JSON.parse(r.stdout) as string[]).map((f) => Buffer.from(f, "base64"));
    const reply = decodeMessage(signer, frames);
    expect(reply.content).toEqual({ echo: "你好" });
    expect(reply.header.msg_type).toBe("generate_reply");
    expect(reply.parentHeader).toEqual(request);
  });

  it("refuses an empty key", () => {
    expect(() => createSigner("")).toThrow(/key is empty/);
  });
});

describe("framing", () => {
  const signer = createSigner(KEY);
  const header = makeHeader("generate", "session-1");

  it("writes the delimiter, the signature and four compact JSON frames", () => {
    const frames = encodeMessage(signer, { header, parentHeader: {}, metadata: {}, content: { n: 1 } });
    expect(frames.map((f) => f.toString("utf8"))).toEqual([
      DELIMITER,
      signer.sign(frames.slice(2)),
      JSON.stringify(header),
      "{}",
      "{}",
      '{"n":1}',
    ]);
    expect(header).toMatchObject({ msg_type: "generate", session: "session-1", version: "1.0" });
    expect(header.msg_id).toMatch(/^[0-9a-f-]{36}$/);
    expect(new Date(header.date).toISOString()).toBe(header.date);
  });

  it("decodes with routing identities or a PUB topic in front", () => {
    const frames = encodeMessage(signer, { header, parentHeader: header, metadata: {}, content: { text: "好" } });
    for (const prefix of [[], [Buffer.from("identity")], [Buffer.from("gpu")]]) {
      const msg = decodeMessage(signer, [...prefix, ...frames]);
      expect(msg.content).toEqual({ text: "好" });
      expect(msg.parentHeader).toEqual(header);
    }
  });

  it("rejects a bad signature, missing delimiter, short messages and non-JSON", () => {
    const frames = encodeMessage(signer, { header, parentHeader: {}, metadata: {}, content: {} });
    const forged = [...frames];
    forged[5] = Buffer.from('{"evil":true}');
    expect(() => decodeMessage(signer, forged)).toThrow(/bad signature/);
    expect(() => decodeMessage(signer, frames.slice(1))).toThrow(/no <IDS\|MSG>/);
    expect(() => decodeMessage(signer, frames.slice(0, 4))).toThrow(/expected 5 frames/);
    const notJson = [Buffer.from("x"), Buffer.from("{}"), Buffer.from("{}"), Buffer.from("{}")];
    expect(() => decodeMessage(signer, [frames[0], Buffer.from(signer.sign(notJson)), ...notJson])).toThrow(WireError);
  });
});
