// Turns schema/bundles.json (the one description of the bundle shapes) into TypeScript declarations
// that the kernel's builders and the extension's renderers both import, so neither can drift.
import { readFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { compile } from "json-schema-to-typescript";

const SCHEMA_DIR = join(dirname(fileURLToPath(import.meta.url)), "..", "schema");
export const SCHEMA_PATH = join(SCHEMA_DIR, "bundles.json");
export const TYPES_PATH = join(SCHEMA_DIR, "bundles.d.ts");

const BANNER = `// Do not edit: written by extension/scripts/gen-types.mjs from schema/bundles.json.
// Change the schema and run \`npm run build:types -w extension\`.`;

/** The declarations file's text for the schema as it is on disk now. */
export async function renderBundleTypes() {
  const schema = JSON.parse(await readFile(SCHEMA_PATH, "utf8"));
  const { ["x-mime-types"]: mimeTypes, ...rest } = schema;
  const body = await compile({ ...rest, title: "Root" }, "Root", {
    unreachableDefinitions: true,
    additionalProperties: false,
    strictIndexSignatures: true,
    bannerComment: "",
    format: true,
  });
  const cleaned = body
    // The generator's provenance notes repeat on every type and say nothing a reader needs.
    .replace(/\n? \*\n \* This interface was referenced by `Root`'s JSON-Schema\n \* via the `definition` "\w+"\.\n/g, "\n")
    .replace(/\/\*\*\n \* This interface was referenced by `Root`'s JSON-Schema\n \* via the `definition` "\w+"\.\n \*\/\n/g, "")
    .replace(/\/\*\*\n(?: \*.*\n)* \*\/\nexport interface Root \{\n(?:.*\n)*?\}\n/, "")
    .replace(/\n{3,}/g, "\n\n");
  const mimeMap = Object.entries(mimeTypes)
    .map(([mime, def]) => `  "${mime}": ${def};`)
    .join("\n");
  return `${BANNER}\n\n${cleaned.trim()}\n\n/** Each custom MIME type and the bundle it carries. */\nexport interface BundleMimeTypes {\n${mimeMap}\n}\n`;
}
