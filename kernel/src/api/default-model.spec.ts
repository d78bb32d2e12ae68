import { mkdirSync, mkdtempSync, utimesSync, writeFileSync } from "node:fs";
import { homedir, tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { chooseDefaultModel, findCachedModel, hubCacheDir } from "./default-model";

const root = mkdtempSync(join(tmpdir(), "qwenbook-default-model-"));

function snapshot(cache: string, id: string, rev: string, files: string[]): string {
  const dir = join(cache, `models--${id.replace("/", "--")}`, "snapshots", rev);
  mkdirSync(dir, { recursive: true });
  for (const f of files) writeFileSync(join(dir, f), "{}");
  return dir;
}

describe("hubCacheDir", () => {
  it("follows HF_HUB_CACHE, then HF_HOME, then XDG_CACHE_HOME, then ~/.cache", () => {
    expect(hubCacheDir({ HF_HUB_CACHE: "/c", HF_HOME: "/h" })).toBe("/c");
    expect(hubCacheDir({ HF_HOME: "/h" })).toBe("/h/hub");
    expect(hubCacheDir({ XDG_CACHE_HOME: "/x" })).toBe("/x/huggingface/hub");
    expect(hubCacheDir({})).toBe(join(homedir(), ".cache", "huggingface", "hub"));
  });
});

describe("findCachedModel", () => {
  it("takes the snapshot refs/main names, and ignores snapshots without weights", () => {
    const cache = join(root, "a");
    snapshot(cache, "Qwen/Q", "old", ["config.json", "model.safetensors"]);
    const main = snapshot(cache, "Qwen/Q", "abc", ["config.json", "model-00001-of-00002.safetensors"]);
    snapshot(cache, "Qwen/Q", "partial", ["config.json"]);
    mkdirSync(join(cache, "models--Qwen--Q", "refs"));
    writeFileSync(join(cache, "models--Qwen--Q", "refs", "main"), "abc\n");
    expect(findCachedModel("Qwen/Q", { HF_HUB_CACHE: cache })).toBe(main);
    expect(findCachedModel("Qwen/Other", { HF_HUB_CACHE: cache })).toBeNull();
  });

  it("without refs/main, takes the newest complete snapshot", () => {
    const cache = join(root, "b");
    const older = snapshot(cache, "Qwen/Q", "one", ["config.json", "pytorch_model.bin"]);
    const newer = snapshot(cache, "Qwen/Q", "two", ["config.json", "model.safetensors"]);
    utimesSync(older, new Date(1_000_000), new Date(1_000_000));
    expect(findCachedModel("Qwen/Q", { HF_HOME: join(cache, "..", "b-home") })).toBeNull();
    expect(findCachedModel("Qwen/Q", { HF_HUB_CACHE: cache })).toBe(newer);
  });
});

describe("chooseDefaultModel", () => {
  const repo = join(root, "repo");
  const tiny = join(repo, ".qwenbook", "models", "tiny-qwen2");
  mkdirSync(tiny, { recursive: true });
  writeFileSync(join(tiny, "config.json"), "{}");
  const empty = join(root, "empty-cache");

  it("uses QWENBOOK_MODEL first", () => {
    expect(chooseDefaultModel("Qwen/Q", { QWENBOOK_MODEL: "/models/mine", QWENBOOK_REPO: repo })).toEqual({ model: "/models/mine" });
  });

  it("falls back to the tiny demo model with a notice saying how to use a real one", () => {
    const c = chooseDefaultModel("Qwen/Qwen2.5-7B-Instruct", { HF_HUB_CACHE: empty, QWENBOOK_REPO: repo });
    expect(c.model).toBe(tiny);
    expect(c.notice).toMatch(/Qwen\/Qwen2\.5-7B-Instruct is not in the local Hugging Face cache.*tiny demo model/);
    expect(c.notice).toMatch(/QWENBOOK_MODEL/);
  });

  it("fails with the way out when there is neither a cached copy nor the tiny model", () => {
    expect(() => chooseDefaultModel("Qwen/Q", { HF_HUB_CACHE: empty, QWENBOOK_REPO: join(root, "no-repo") })).toThrow(
      /tiny demo model is missing.*npx qwenbook tiny-model.*QWENBOOK_MODEL/s,
    );
    expect(() => chooseDefaultModel("", {})).toThrow(RangeError);
  });
});
