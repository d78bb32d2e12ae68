// Paths the build and install scripts share.
import { existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const EXTENSION_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "..");
export const REPO_DIR = resolve(EXTENSION_DIR, "..");
export const LABEXTENSION_DIR = join(EXTENSION_DIR, "labextension");

/** The Python environment with JupyterLab: QWENBOOK_VENV, else the repository's .venv. */
export function venvPrefix(given) {
  return resolve(given ?? process.env.QWENBOOK_VENV ?? join(REPO_DIR, ".venv"));
}

export function requireJupyter(prefix) {
  const jupyter = join(prefix, "bin", "jupyter");
  if (!existsSync(jupyter)) {
    throw new Error(
      `JupyterLab was not found at ${jupyter}. Run the setup first (npm start or npm test from the ` +
        `repository root creates .venv), or point QWENBOOK_VENV at an environment with jupyterlab 4.6 installed.`,
    );
  }
  return jupyter;
}
