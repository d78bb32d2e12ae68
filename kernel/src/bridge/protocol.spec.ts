import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { generate, generateFromFile, outputPath, schemaPath } from "../../scripts/gen-protocol.mjs";
import { EVENT_TYPES, PROTOCOL_VERSION, REQUEST_TYPES } from "./protocol.gen";

describe("protocol.gen.ts", () => {
  it("is what gen-protocol.mjs makes from the current protocol.json (else run `npm run gen:protocol -w kernel`)", () => {
    expect(readFileSync(outputPath, "utf8")).toBe(generateFromFile());
  });

  it("lists the schema's requests, events and version", () => {
    const schema = JSON.parse(readFileSync(schemaPath, "utf8")) as Record<string, Record<string, unknown>>;
    expect(REQUEST_TYPES).toEqual(Object.keys(schema["x-requests"]));
    expect(EVENT_TYPES).toEqual(Object.keys(schema["x-events"]));
    expect(PROTOCOL_VERSION).toBe(schema["x-protocol-version"]);
  });
});

describe("gen-protocol.mjs", () => {
  const base = { "x-protocol-version": "1.0", "x-requests": {}, "x-events": {}, "x-broadcasts": {} };

  it("turns required, optional, enums, consts, arrays and refs into TypeScript", () => {
    const out = generate({
      ...base,
      $defs: {
        Item: { type: "object", required: ["id"], properties: { id: { type: "integer" } } },
        Thing: {
          type: "object",
          required: ["kind", "items"],
          properties: {
            kind: { const: "thing" },
            mode: { enum: ["a", "b"], default: "a", description: "How" },
            items: { type: "array", items: { $ref: "#/$defs/Item" } },
          },
        },
      },
    });
    expect(out).toContain("export interface Thing {");
    expect(out).toContain('  kind: "thing";');
    expect(out).toContain('  mode?: "a" | "b";');
    expect(out).toContain("  items: Array<Item>;");
    expect(out).toContain('@default "a"');
  });

  it("turns anyOf into a union and an object without properties into an open or an empty record", () => {
    const out = generate({
      ...base,
      $defs: {
        Lora: {
          type: "object",
          properties: {
            targets: { anyOf: [{ const: "all-linear" }, { type: "array", items: { type: "string" } }] },
            extra: { type: "object" },
            none: { type: "object", additionalProperties: false },
          },
        },
      },
    });
    expect(out).toContain('  targets?: "all-linear" | Array<string>;');
    expect(out).toContain("  extra?: Record<string, unknown>;");
    expect(out).toContain("  none?: Record<string, never>;");
  });

  it("refuses schema features it does not understand instead of guessing", () => {
    expect(() => generate({ ...base, $defs: { X: { oneOf: [] } } })).toThrow(/"oneOf" is not supported/);
    expect(() => generate({ ...base, $defs: { X: { type: "object", required: ["a"], properties: {} } } })).toThrow(/required "a"/);
    expect(() => generate({ ...base, "x-requests": { go: { request: "Nope", reply: "Nope", events: [] } }, $defs: {} })).toThrow(
      /not in \$defs/,
    );
  });
});
