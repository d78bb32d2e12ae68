import { existsSync, readFileSync, readdirSync, statSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { repoDir } from "../bridge/paths";
import { expectString } from "./validate";

type Env = Readonly<Record<string, string | undefined>>;

/** The Hugging Face hub cache, by the same variables huggingface_hub reads. */
export function hubCacheDir(env: Env = process.env): string {
  if (env.HF_HUB_CACHE) return env.HF_HUB_CACHE;
  const hfHome = env.HF_HOME ?? join(env.XDG_CACHE_HOME ?? join(homedir(), ".cache"), "huggingface");
  return join(hfHome, "hub");
}

const WEIGHT_FILE = /\.(safetensors|bin)$|^(model|pytorch_model)\.(safetensors|bin)\.index\.json$/;

function isCompleteSnapshot(dir: string): boolean {
  try {
    return existsSync(join(dir, "config.json")) && readdirSync(dir).some((f) => WEIGHT_FILE.test(f));
  } catch {
    return false;
  }
}

/**
 * The folder of a fully downloaded copy of `id` in the hub cache, or null. Prefers the snapshot
 * `refs/main` points at, else the newest complete one.
 */
export function findCachedModel(id: string, env: Env = process.env): string | null {
  const repo = join(hubCacheDir(env), `models--${id.split("/").join("--")}`);
  const snapshots = join(repo, "snapshots");
  if (!existsSync(snapshots)) return null;
  try {
    const main = readFileSync(join(repo, "refs", "main"), "utf8").trim();
    if (main && isCompleteSnapshot(join(snapshots, main))) return join(snapshots, main);
  } catch {
    // No refs/main (e.g. downloaded by revision): fall through to the newest snapshot.
  }
  const candidates = readdirSync(snapshots)
    .map((name) => join(snapshots, name))
    .filter(isCompleteSnapshot)
    .sort((a, b) => statSync(b).mtimeMs - statSync(a).mtimeMs);
  return candidates[0] ?? null;
}

export function tinyModelDir(env: Env = process.env): string | null {
  const repo = repoDir(env);
  return repo ? join(repo, ".qwenbook", "models", "tiny-qwen2") : null;
}

export interface DefaultModelChoice {
  model: string;
  /** Set when the tiny demo model stands in for the one asked for. */
  notice?: string;
}

/**
 * Picks the model a notebook should load for `id`: QWENBOOK_MODEL if set, else a cached copy of
 * `id`, else the tiny demo model (with a notice saying so and how to use a real model).
 */
export function chooseDefaultModel(id: string, env: Env = process.env): DefaultModelChoice {
  expectString("defaultModel(id)", id, { nonEmpty: true });
  if (env.QWENBOOK_MODEL) return { model: env.QWENBOOK_MODEL };
  const cached = findCachedModel(id, env);
  if (cached) return { model: cached };
  const tiny = tinyModelDir(env);
  const how =
    `To use ${id}, download it (e.g. \`huggingface-cli download ${id}\`) into ${hubCacheDir(env)}, ` +
    "or set QWENBOOK_MODEL to a model folder or hub id before starting Jupyter.";
  if (tiny && existsSync(join(tiny, "config.json"))) {
    return {
      model: tiny,
      notice:
        `Note: ${id} is not in the local Hugging Face cache, so this uses the tiny demo model at ${tiny}; ` +
        `its replies are random text.\n${how}`,
    };
  }
  throw new Error(
    `${id} is not in the local Hugging Face cache and the tiny demo model is missing` +
      (tiny ? ` (${tiny}; make it with \`npx qwenbook tiny-model ${tiny}\`)` : "") +
      `. ${how}`,
  );
}
