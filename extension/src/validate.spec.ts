import { describe, expect, it } from "vitest";
import { CHAT_MIME, GPU_MIME, TRAIN_MIME } from "./mime";
import { chat, gpu, train } from "./testutil";
import { parseBundle } from "./validate";

describe("parseBundle", () => {
  it("accepts each kind of bundle", () => {
    expect(parseBundle(CHAT_MIME, chat()).ok).toBe(true);
    expect(parseBundle(TRAIN_MIME, train()).ok).toBe(true);
    expect(parseBundle(GPU_MIME, gpu()).ok).toBe(true);
  });

  it("ignores fields it does not know, at any depth", () => {
    const bundle = { ...chat(), future: { x: 1 }, messages: [{ role: "user", content: "hi", lang: "en" }] };
    const r = parseBundle(CHAT_MIME, bundle);
    expect(r.ok).toBe(true);
  });

  it("explains a bundle from a newer version and how to fix it", () => {
    const r = parseBundle(TRAIN_MIME, { ...train(), version: 2, series: "new shape" });
    expect(r.ok).toBe(false);
    if (r.ok) return;
    expect(r.problem.title).toBe("This training dashboard was written by a newer Qwenbook");
    expect(r.problem.detail).toBe("It is bundle version 2; the installed extension reads version 1.");
    expect(r.problem.hint).toMatch(/Update the Qwenbook JupyterLab extension/);
  });

  it("names the missing version", () => {
    const { version: _v, ...rest } = chat();
    const r = parseBundle(CHAT_MIME, rest);
    expect(!r.ok && r.problem.detail).toBe('the "version" field is missing');
  });

  it("points at the wrong fields with the allowed values", () => {
    const r = parseBundle(CHAT_MIME, { ...chat(), state: "thinking", messages: [{ role: "robot", content: 3 }] });
    expect(r.ok).toBe(false);
    if (r.ok) return;
    expect(r.problem.title).toBe("This chat output is malformed");
    expect(r.problem.detail).toContain('/state must be equal to one of the allowed values: "generating", "done", "cancelled", "error"');
    expect(r.problem.detail).toContain("/messages/0/role must be equal to one of the allowed values");
    expect(r.problem.detail).toContain("/messages/0/content must be string");
  });

  it("rejects things that are not objects, saying what they are", () => {
    const r = parseBundle(GPU_MIME, "{not json");
    expect(!r.ok && r.problem.detail).toBe('expected a JSON object, got a string ("{not json")');
    const a = parseBundle(GPU_MIME, [1]);
    expect(!a.ok && a.problem.detail).toBe("expected a JSON object, got an array");
    const n = parseBundle(GPU_MIME, null);
    expect(!n.ok && n.problem.detail).toBe("expected a JSON object, got null");
  });

  it("rejects an old or fractional version as malformed", () => {
    const r = parseBundle(GPU_MIME, { ...gpu(), version: 0 });
    expect(!r.ok && r.problem.detail).toBe("/version must be equal to constant 1");
  });

  it("catches series that do not line up", () => {
    const base = train();
    const r = parseBundle(TRAIN_MIME, { ...base, train: { ...base.train, loss: base.train.loss.slice(1) } });
    expect(!r.ok && r.problem.detail).toBe("/train/loss has 49 values but /train/step has 50");
    const e = parseBundle(TRAIN_MIME, { ...base, eval: { step: [1, 2], loss: [1] } });
    expect(!e.ok && e.problem.detail).toBe("/eval/loss has 1 values but /eval/step has 2");
  });

  it("lists at most four problems and counts the rest", () => {
    const devices = Array.from({ length: 6 }, (_, i) => ({ device: `cuda:${i}`, kind: "cuda", used: "lots", total: 1 }));
    const r = parseBundle(GPU_MIME, { version: 1, devices });
    expect(!r.ok && r.problem.detail).toMatch(/\(and 2 more\)$/);
  });
});
