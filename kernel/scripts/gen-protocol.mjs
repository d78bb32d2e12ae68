#!/usr/bin/env node
// Turns the two contracts' JSON Schemas into TypeScript, so the kernel cannot drift from the Python worker
// or from the JupyterLab extension: `node scripts/gen-protocol.mjs` rewrites src/bridge/protocol.gen.ts
// (from protocol.json) and src/display/bundles.gen.ts (from bundles.json, the display bundles), and a
// unit test fails while a committed file differs from what this script would write.
// Only the schema features the two schemas use are supported; anything else is an error, not a guess.
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const kernelDir = join(dirname(fileURLToPath(import.meta.url)), "..");
export const schemaDir = join(kernelDir, "..", "python-bridge", "qwenbook_bridge", "schema");
export const schemaPath = join(schemaDir, "protocol.json");
export const outputPath = join(kernelDir, "src", "bridge", "protocol.gen.ts");
export const bundlesSchemaPath = join(schemaDir, "bundles.json");
export const bundlesOutputPath = join(kernelDir, "src", "display", "bundles.gen.ts");

const KNOWN_KEYS = new Set([
  "type", "properties", "required", "additionalProperties", "items", "enum", "const", "$ref", "description",
  "default", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems",
  "maxItems", "pattern", "anyOf", "allOf",
]);

/** How a `$ref` is named in the generated file: local `#/$defs/X` as X; the bundles also reach into protocol.json. */
function localRef(ref, where) {
  const m = /^#\/\$defs\/(\w+)$/.exec(ref);
  if (!m) throw new Error(`${where}: only local #/$defs/ references are supported, got ${ref}`);
  return m[1];
}

function docComment(lines, indent) {
  const text = lines.filter(Boolean);
  if (text.length === 0) return "";
  if (text.length === 1 && !text[0].includes("\n")) return `${indent}/** ${text[0]} */\n`;
  const body = text.flatMap((t) => t.split("\n")).map((l) => `${indent} * ${l}`.trimEnd()).join("\n");
  return `${indent}/**\n${body}\n${indent} */\n`;
}

function constraints(s) {
  const out = [];
  for (const k of ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "pattern"]) {
    if (k in s) out.push(`${k} ${JSON.stringify(s[k])}`);
  }
  if ("default" in s) out.push(`@default ${JSON.stringify(s.default)}`);
  return out.length ? out.join("; ").replace("; @default", "\n@default") : "";
}

function typeOf(s, where, indent, ref = localRef) {
  for (const k of Object.keys(s)) {
    if (!KNOWN_KEYS.has(k)) throw new Error(`${where}: schema keyword "${k}" is not supported by gen-protocol.mjs`);
  }
  if (s.$ref) return ref(s.$ref, where);
  if ("const" in s) return JSON.stringify(s.const);
  if (s.anyOf) return s.anyOf.map((alt, i) => typeOf(alt, `${where}|${i}`, indent, ref)).join(" | ");
  if (s.allOf) {
    // allOf extends shapes: each part, and the object's own properties when it has some.
    const { allOf, ...own } = s;
    const parts = allOf.map((part, i) => typeOf(part, `${where}&${i}`, indent, ref));
    if (own.properties) parts.push(typeOf(own, where, indent, ref));
    return parts.join(" & ");
  }
  if (s.enum) return s.enum.map((v) => JSON.stringify(v)).join(" | ");
  if (Array.isArray(s.type)) return s.type.map((t) => typeOf({ ...s, type: t }, where, indent, ref)).join(" | ");
  switch (s.type) {
    case "string":
      return "string";
    case "integer":
    case "number":
      return "number";
    case "boolean":
      return "boolean";
    case "null":
      return "null";
    case "array":
      if (!s.items) throw new Error(`${where}: arrays need "items"`);
      return `Array<${typeOf(s.items, `${where}[]`, indent, ref)}>`;
    case "object":
      return objectBody(s, where, indent, ref);
    default:
      throw new Error(`${where}: unsupported type ${JSON.stringify(s.type)}`);
  }
}

function objectBody(s, where, indent, ref) {
  const props = s.properties ?? {};
  const required = new Set(s.required ?? []);
  for (const r of required) if (!(r in props)) throw new Error(`${where}: required "${r}" has no property`);
  const names = Object.keys(props);
  const extra = s.additionalProperties;
  if (typeof extra === "object" && extra !== null) {
    if (names.length > 0) throw new Error(`${where}: properties beside an additionalProperties schema are not supported`);
    return `Record<string, ${typeOf(extra, `${where}{}`, indent, ref)}>`;
  }
  // No properties: an empty object when closed, any JSON object (rows, option dumps) when open.
  if (names.length === 0) return extra === false ? "Record<string, never>" : "Record<string, unknown>";
  const inner = indent + "  ";
  let out = "{\n";
  for (const name of names) {
    const p = props[name];
    out += docComment([p.description, constraints(p)], inner);
    const key = /^[A-Za-z_$][\w$]*$/.test(name) ? name : JSON.stringify(name);
    out += `${inner}${key}${required.has(name) ? "" : "?"}: ${typeOf(p, `${where}.${name}`, inner, ref)};\n`;
  }
  return out + `${indent}}`;
}

/** Returns the TypeScript source for a protocol schema object. */
export function generate(schema) {
  const defs = schema.$defs ?? {};
  const version = schema["x-protocol-version"];
  if (typeof version !== "string") throw new Error('protocol.json needs a string "x-protocol-version"');
  let out = "";
  out += "// Types for the worker protocol, made from python-bridge/qwenbook_bridge/schema/protocol.json by\n";
  out += "// kernel/scripts/gen-protocol.mjs. Edit the schema and run `npm run gen:protocol -w kernel`, not this file.\n\n";
  out += `/** Protocol version this kernel speaks; the worker refuses a different major version at hello. */\n`;
  out += `export const PROTOCOL_VERSION = ${JSON.stringify(version)};\n\n`;
  for (const [name, def] of Object.entries(defs)) {
    out += docComment([def.description], "");
    const body = typeOf(def, name, "");
    out += body.startsWith("{") ? `export interface ${name} ${body}\n\n` : `export type ${name} = ${body};\n\n`;
  }
  const ref = (kind, name) => {
    if (!(name in defs)) throw new Error(`${kind} names "${name}", which is not in $defs`);
    return name;
  };
  const events = schema["x-events"] ?? {};
  const requests = schema["x-requests"] ?? {};
  const broadcasts = schema["x-broadcasts"] ?? {};
  out += "/** Every request type: its content, its ok reply, and the events it may stream before the reply. */\n";
  out += "export interface RequestMap {\n";
  for (const [type, r] of Object.entries(requests)) {
    for (const e of r.events) if (!(e in events)) throw new Error(`request ${type} lists unknown event ${e}`);
    const ev = r.events.length ? r.events.map((e) => JSON.stringify(e)).join(" | ") : "never";
    out += `  ${type}: { request: ${ref(type, r.request)}; reply: ${ref(type, r.reply)}; events: ${ev} };\n`;
  }
  out += "}\n\n/** Events streamed for a request, keyed by msg_type. */\nexport interface EventMap {\n";
  for (const [type, name] of Object.entries(events)) out += `  ${type}: ${ref(type, name)};\n`;
  out += "}\n\n/** Worker-wide telemetry on the PUB socket, keyed by topic (msg_type). */\nexport interface BroadcastMap {\n";
  for (const [type, name] of Object.entries(broadcasts)) out += `  ${type}: ${ref(type, name)};\n`;
  out += "}\n\n";
  out += "export type RequestType = keyof RequestMap;\nexport type EventType = keyof EventMap;\nexport type BroadcastType = keyof BroadcastMap;\n\n";
  const list = (o) => `[${Object.keys(o).map((k) => JSON.stringify(k)).join(", ")}]`;
  out += `export const REQUEST_TYPES: readonly RequestType[] = ${list(requests)};\n`;
  out += `export const EVENT_TYPES: readonly EventType[] = ${list(events)};\n`;
  out += `export const BROADCAST_TYPES: readonly BroadcastType[] = ${list(broadcasts)};\n`;
  for (const name of schema["x-field-constants"] ?? []) out += "\n" + fieldConstants(name, defs[name]);
  return out;
}

/** "TrainOptions" -> "TRAIN_OPTIONS". */
export function constPrefix(name) {
  return name.replace(/([a-z0-9])([A-Z])/g, "$1_$2").toUpperCase();
}

/**
 * An options object's field names, defaults and enums as values, for code that must walk every field
 * (the notebook API's option names, its wire form, the dashboard's config table): a field added to the
 * schema reaches them with no list to edit.
 */
function fieldConstants(name, def) {
  if (!def || def.type !== "object" || !def.properties) {
    throw new Error(`x-field-constants names "${name}", which is not an object with properties in $defs`);
  }
  const prefix = constPrefix(name);
  const props = Object.entries(def.properties);
  const names = props.map(([field]) => JSON.stringify(field));
  const lit = (v) => (Array.isArray(v) ? `[${v.map(lit).join(", ")}]` : JSON.stringify(v));
  const block = (lines) => (lines.length ? `{\n${lines.join("\n")}\n}` : "{}");
  const defaults = props.filter(([, p]) => "default" in p).map(([field, p]) => `  ${field}: ${lit(p.default)},`);
  const enums = props.filter(([, p]) => p.enum).map(([field, p]) => `  ${field}: ${lit(p.enum)},`);
  let out = `/** ${name}'s fields, in schema order. */\n`;
  out += `export const ${prefix}_FIELDS = [${names.join(", ")}] as const satisfies ReadonlyArray<keyof ${name}>;\n\n`;
  out += `/** What the worker uses for each ${name} field with a default when it is absent. */\n`;
  out += `export const ${prefix}_DEFAULTS = ${block(defaults)} as const satisfies { readonly [K in keyof ${name}]?: unknown };\n\n`;
  out += `/** The values each enum field of ${name} allows. */\n`;
  out += `export const ${prefix}_ENUMS = ${block(enums)} as const satisfies { readonly [K in keyof ${name}]?: ReadonlyArray<${name}[K]> };\n`;
  return out;
}

export function generateFromFile(path = schemaPath) {
  return generate(JSON.parse(readFileSync(path, "utf8")));
}

/** The one place a bundle schema may point outside itself: `protocol.json#/$defs/X`, a type of protocol.gen.ts. */
const PROTOCOL_REF = /^protocol\.json#\/\$defs\/(\w+)$/;

/** "ChatBundle" -> "CHAT_MIME": the constant each MIME type of `x-mime-types` gets. */
export function mimeConstName(def) {
  const m = /^([A-Z][A-Za-z]*)Bundle$/.exec(def);
  if (!m) throw new Error(`x-mime-types names "${def}": a bundle's $defs name must end in "Bundle"`);
  return `${m[1].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase()}_MIME`;
}

/**
 * Returns the TypeScript source for the display bundles' schema: their types, the MIME type constants
 * and the bundle version. `protocolDefs` (protocol.json's $defs) is where a relative protocol.json ref must land.
 */
export function generateBundles(schema, protocolDefs) {
  const defs = schema.$defs ?? {};
  const mimeTypes = schema["x-mime-types"];
  if (!mimeTypes || Object.keys(mimeTypes).length === 0) throw new Error('bundles.json needs "x-mime-types": MIME type to bundle');
  const imported = new Set();
  const ref = (r, where) => {
    const m = PROTOCOL_REF.exec(r);
    if (!m) return localRef(r, where);
    if (!(m[1] in protocolDefs)) throw new Error(`${where}: ${r} is not in protocol.json's $defs`);
    imported.add(m[1]);
    return m[1];
  };
  let body = "";
  for (const [name, def] of Object.entries(defs)) {
    body += docComment([def.description], "");
    const type = typeOf(def, name, "", ref);
    body += type.startsWith("{") ? `export interface ${name} ${type}\n\n` : `export type ${name} = ${type};\n\n`;
  }
  const versions = new Set();
  let consts = "";
  for (const [mime, def] of Object.entries(mimeTypes)) {
    if (!(def in defs)) throw new Error(`x-mime-types names "${def}", which is not in $defs`);
    const version = defs[def].properties?.version?.const;
    if (!Number.isInteger(version)) throw new Error(`${def} needs "version": { "const": <integer> }`);
    versions.add(version);
    consts += `export const ${mimeConstName(def)} = ${JSON.stringify(mime)};\n`;
  }
  if (versions.size !== 1) throw new Error(`every bundle must carry the same version const, got ${[...versions].join(", ")}`);
  let out = "";
  out += "// Types of the display bundles the JupyterLab extension renders, made from\n";
  out += "// python-bridge/qwenbook_bridge/schema/bundles.json by kernel/scripts/gen-protocol.mjs.\n";
  out += "// Edit the schema and run `npm run gen:protocol -w kernel`, not this file.\n";
  if (imported.size) out += `import type { ${[...imported].sort().join(", ")} } from "../bridge/protocol.gen";\n`;
  out += "\n/** The bundle version this kernel writes; the extension refuses a newer one. */\n";
  out += `export const BUNDLE_VERSION = ${[...versions][0]};\n\n`;
  out += "/** The custom MIME types, one per bundle. */\n" + consts + "\n";
  out += body;
  out += "/** Each custom MIME type and the bundle it carries. */\nexport interface BundleMimeTypes {\n";
  for (const [mime, def] of Object.entries(mimeTypes)) out += `  [${mimeConstName(def)}]: ${def};\n`;
  out += "}\n\nexport type BundleMime = keyof BundleMimeTypes;\n";
  return out;
}

const readJson = (path) => JSON.parse(readFileSync(path, "utf8"));

export function generateBundlesFromFile(path = bundlesSchemaPath, protocolPath = schemaPath) {
  return generateBundles(readJson(path), readJson(protocolPath).$defs ?? {});
}

/**
 * bundles.json with what it takes from protocol.json copied into its own $defs (and the refs made
 * local), so a validator needs one self-contained schema.
 */
export function resolvedBundlesSchema(path = bundlesSchemaPath, protocolPath = schemaPath) {
  const schema = readJson(path);
  const protocolDefs = readJson(protocolPath).$defs ?? {};
  const defs = { ...schema.$defs };
  const pending = [];
  const walk = (node, fromProtocol) => {
    if (Array.isArray(node)) return node.map((n) => walk(n, fromProtocol));
    if (typeof node !== "object" || node === null) return node;
    const out = {};
    for (const [k, v] of Object.entries(node)) out[k] = k === "$ref" ? localize(v, fromProtocol) : walk(v, fromProtocol);
    return out;
  };
  const localize = (r, fromProtocol) => {
    const m = PROTOCOL_REF.exec(r) ?? (fromProtocol ? /^#\/\$defs\/(\w+)$/.exec(r) : null);
    if (!m) return r;
    if (!(m[1] in protocolDefs)) throw new Error(`${r} is not in protocol.json's $defs`);
    if (m[1] in schema.$defs) throw new Error(`bundles.json and protocol.json both define ${m[1]}`);
    if (!(m[1] in defs)) {
      defs[m[1]] = null;
      pending.push(m[1]);
    }
    return `#/$defs/${m[1]}`;
  };
  for (const [name, def] of Object.entries(schema.$defs)) defs[name] = walk(def, false);
  while (pending.length) {
    const name = pending.shift();
    defs[name] = walk(protocolDefs[name], true);
  }
  return { ...schema, $defs: defs };
}

/** Rewrites each generated file whose text differs from what its schema gives; returns the paths rewritten. */
export function regenerate() {
  const written = [];
  for (const [path, text] of [[outputPath, generateFromFile()], [bundlesOutputPath, generateBundlesFromFile()]]) {
    if (existsSync(path) && readFileSync(path, "utf8") === text) continue;
    writeFileSync(path, text);
    written.push(relative(process.cwd(), path));
  }
  return written;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const written = regenerate();
  for (const path of written) console.log(`wrote ${path}`);
  if (written.length === 0) console.log("protocol.gen.ts and bundles.gen.ts are up to date");
}
