// Turns python-bridge/qwenbook_bridge/schema/bundles.json (the one description of the bundle shapes and
// their MIME types, shared with the kernel, which generates its own copy of the types) into
// src/bundles.gen.ts: the types, the MIME type constants, and the schema itself for validation, with
// what it takes from protocol.json (the gauge's DeviceMemory) copied in so it stands alone in the browser.
import { readFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { compile } from "json-schema-to-typescript";

const EXTENSION_DIR = join(dirname(fileURLToPath(import.meta.url)), "..");
export const SCHEMA_DIR = join(EXTENSION_DIR, "..", "python-bridge", "qwenbook_bridge", "schema");
export const SCHEMA_PATH = join(SCHEMA_DIR, "bundles.json");
export const PROTOCOL_PATH = join(SCHEMA_DIR, "protocol.json");
export const TYPES_PATH = join(EXTENSION_DIR, "src", "bundles.gen.ts");

const BANNER = `// Do not edit: written by extension/scripts/gen-types.mjs from python-bridge/qwenbook_bridge/schema/bundles.json.
// Change the schema and run \`npm run build:types -w extension\` (the build does it when the schema is newer).`;

/** The one place a bundle schema may point outside itself: a type of the worker protocol. */
const PROTOCOL_REF = /^protocol\.json#\/\$defs\/(\w+)$/;
const LOCAL_REF = /^#\/\$defs\/(\w+)$/;

/**
 * The schema with each `protocol.json#/$defs/X` it uses (and what X uses in turn) copied into its own
 * $defs and the references made local.
 */
export function resolveProtocolRefs(schema, protocol) {
  const protocolDefs = protocol.$defs ?? {};
  // The bundles' own definitions first, in their order; what they take from protocol.json after them.
  const defs = Object.fromEntries(Object.keys(schema.$defs).map((name) => [name, null]));
  const pending = [];
  const localize = (ref, inProtocol) => {
    const m = PROTOCOL_REF.exec(ref) ?? (inProtocol ? LOCAL_REF.exec(ref) : null);
    if (!m) return ref;
    const name = m[1];
    if (!(name in protocolDefs)) throw new Error(`bundles.json: ${ref} is not in protocol.json's $defs`);
    if (name in schema.$defs) throw new Error(`bundles.json and protocol.json both define ${name}`);
    if (!(name in defs)) {
      defs[name] = null;
      pending.push(name);
    }
    return `#/$defs/${name}`;
  };
  const walk = (node, inProtocol) => {
    if (Array.isArray(node)) return node.map((n) => walk(n, inProtocol));
    if (typeof node !== "object" || node === null) return node;
    return Object.fromEntries(
      Object.entries(node).map(([k, v]) => [k, k === "$ref" ? localize(v, inProtocol) : walk(v, inProtocol)]),
    );
  };
  for (const [name, def] of Object.entries(schema.$defs)) defs[name] = walk(def, false);
  while (pending.length) {
    const name = pending.shift();
    defs[name] = walk(protocolDefs[name], true);
  }
  return { ...schema, $defs: defs };
}

/** "ChatBundle" -> "CHAT_MIME": the constant each MIME type of `x-mime-types` gets (as in the kernel). */
function mimeConstName(def) {
  const m = /^([A-Z][A-Za-z]*)Bundle$/.exec(def);
  if (!m) throw new Error(`x-mime-types names "${def}": a bundle's $defs name must end in "Bundle"`);
  return `${m[1].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase()}_MIME`;
}

/** The generated file's text for the schemas as they are on disk now. */
export async function renderBundleTypes() {
  const [raw, protocol] = await Promise.all([SCHEMA_PATH, PROTOCOL_PATH].map(async (p) => JSON.parse(await readFile(p, "utf8"))));
  const schema = resolveProtocolRefs(raw, protocol);
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
  const versions = new Set(Object.values(mimeTypes).map((def) => schema.$defs[def]?.properties?.version?.const));
  if (versions.size !== 1 || !Number.isInteger([...versions][0])) {
    throw new Error(`every bundle in x-mime-types needs the same "version": { "const": <integer> }, got ${[...versions].join(", ")}`);
  }
  const consts = Object.entries(mimeTypes)
    .map(([mime, def]) => `export const ${mimeConstName(def)} = ${JSON.stringify(mime)};`)
    .join("\n");
  const mimeMap = Object.values(mimeTypes)
    .map((def) => `  [${mimeConstName(def)}]: ${def};`)
    .join("\n");
  const defsOf = Object.entries(mimeTypes)
    .map(([, def]) => `  [${mimeConstName(def)}]: ${JSON.stringify(def)},`)
    .join("\n");
  return [
    BANNER,
    "",
    "/** The bundle version this build reads; the schema pins it with `const`. */",
    `export const BUNDLE_VERSION = ${[...versions][0]};`,
    "",
    "/** The custom MIME types, one per bundle. */",
    consts,
    "",
    cleaned.trim(),
    "",
    "/** Each custom MIME type and the bundle it carries. */",
    `export interface BundleMimeTypes {\n${mimeMap}\n}`,
    "",
    "export type BundleMime = keyof BundleMimeTypes;",
    "",
    "/** Schema `$defs` entry for each MIME type, as listed in the schema's `x-mime-types`. */",
    `export const BUNDLE_DEF: Readonly<Record<BundleMime, string>> = {\n${defsOf}\n};`,
    "",
    "/** The schema the renderers validate with, protocol.json's types it uses copied in. */",
    `export const BUNDLE_SCHEMA: Readonly<Record<string, unknown>> & { readonly $id: string } = ${JSON.stringify(schema, null, 2)};`,
    "",
  ].join("\n");
}
