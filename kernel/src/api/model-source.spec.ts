import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { resolveModelSource } from "./model-source";

const cwd = mkdtempSync(join(tmpdir(), "qwenbook-source-"));
mkdirSync(join(cwd, "models", "mine"), { recursive: true });
mkdirSync(join(cwd, "Org", "Name"), { recursive: true });
writeFileSync(join(cwd, "weights.bin"), "");

describe("resolveModelSource", () => {
  it("makes existing folders absolute, since the worker runs elsewhere", () => {
    expect(resolveModelSource("./models/mine", cwd)).toBe(join(cwd, "models", "mine"));
    expect(resolveModelSource("models/mine", cwd)).toBe(join(cwd, "models", "mine"));
    expect(resolveModelSource("Org/Name", cwd)).toBe(join(cwd, "Org", "Name"));
  });

  it("passes hub ids through", () => {
    expect(resolveModelSource("Qwen/Qwen2.5-7B-Instruct", cwd)).toBe("Qwen/Qwen2.5-7B-Instruct");
    expect(resolveModelSource("gpt2", cwd)).toBe("gpt2");
  });

  it("names the path it tried when a folder is missing", () => {
    expect(() => resolveModelSource("./nope", cwd)).toThrow(`No model folder at ${join(cwd, "nope")}`);
    expect(() => resolveModelSource("/no/such/model", cwd)).toThrow(/No model folder at \/no\/such\/model/);
    expect(() => resolveModelSource("a/b/c", cwd)).toThrow(/No model folder/);
  });

  it("rejects files, empty strings, non-strings and strings that are no hub id", () => {
    expect(() => resolveModelSource("weights.bin", cwd)).toThrow(/is a file/);
    expect(() => resolveModelSource("  ", cwd)).toThrow(RangeError);
    expect(() => resolveModelSource(7, cwd)).toThrow(new TypeError("load(model) expects a string, got number 7"));
    expect(() => resolveModelSource("what is this?", cwd)).toThrow(/neither an existing folder nor a hub id/);
  });
});
