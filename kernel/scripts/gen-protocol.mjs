#!/usr/bin/env node
// Turns the worker protocol's JSON Schema into TypeScript types, so the kernel cannot drift from the
// Python side: `node scripts/gen-protocol.mjs` rewrites src/bridge/protocol.gen.ts, and a unit test
// fails while the committed file differs from what this script would write.
// Only the schema features protocol.json uses are supported; anything else is an error, not a guess.
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const kernelDir = join(dirname(fileURLToPath(import.meta.url)), "..");
export const schemaPath = join(kernelDir, "..", "python-bridge", "qwenbook_bridge", "schema", "protocol.json");
export const outputPath = join(kernelDir, "src", "bridge", "protocol.gen.ts");

const KNOWN_KEYS = new Set([
  "type", "properties", "required", "additionalProperties", "items", "enum", "const", "$ref", "description",
  "default", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems",
  "maxItems", "pattern", "anyOf",
]);

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

function typeOf(s, where, indent) {
  for (const k of Object.keys(s)) {
    if (!KNOWN_KEYS.has(k)) throw new Error(`${where}: schema keyword "${k}" is not supported by gen-protocol.mjs`);
  }
  if (s.$ref) {
    const m = /^#\/\$defs\/(\w+)$/.exec(s.$ref);
    if (!m) throw new Error(`${where}: only local #/$defs/ references are supported, got ${s.$ref}`);
    return m[1];
  }
  if ("const" in s) return JSON.stringify(s.const);
  if (s.anyOf) return s.anyOf.map((alt, i) => typeOf(alt, `${where}|${i}`, indent)).join(" | ");
  if (s.enum) return s.enum.map((v) => JSON.stringify(v)).join(" | ");
  switch (s.type) {
    case "string":
      return "string";
    case "integer":
    case "number":
      return "number";
    case "boolean":
      return "boolean";
    case "array":
      if (!s.items) throw new Error(`${where}: arrays need "items"`);
      return `Array<${typeOf(s.items, `${where}[]`, indent)}>`;
    case "object":
      return objectBody(s, where, indent);
    default:
      throw new Error(`${where}: unsupported type ${JSON.stringify(s.type)}`);
  }
}

function objectBody(s, where, indent) {
  const props = s.properties ?? {};
  const required = new Set(s.required ?? []);
  for (const r of required) if (!(r in props)) throw new Error(`${where}: required "${r}" has no property`);
  const names = Object.keys(props);
  // No properties: an empty object when closed, any JSON object (rows, option dumps) when open.
  if (names.length === 0) return s.additionalProperties === false ? "Record<string, never>" : "Record<string, unknown>";
  const inner = indent + "  ";
  let out = "{\n";
  for (const name of names) {
    const p = props[name];
    out += docComment([p.description, constraints(p)], inner);
    const key = /^[A-Za-z_$][\w$]*$/.test(name) ? name : JSON.stringify(name);
    out += `${inner}${key}${required.has(name) ? "" : "?"}: ${typeOf(p, `${where}.${name}`, inner)};\n`;
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
  return out;
}

export function generateFromFile(path = schemaPath) {
  return generate(JSON.parse(readFileSync(path, "utf8")));
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  writeFileSync(outputPath, generateFromFile());
  console.log(`wrote ${relative(process.cwd(), outputPath)} from ${relative(process.cwd(), schemaPath)}`);
}
