import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import {
  PROTOCOL_PATH,
  SCHEMA_PATH,
  TYPES_PATH,
  renderBundleTypes,
  resolveProtocolRefs,
  // @ts-expect-error: a plain .mjs build script without declarations
} from "../scripts/bundle-types.mjs";
import { BUNDLE_DEF, BUNDLE_SCHEMA, CHAT_MIME, GPU_MIME, TRAIN_MIME } from "./bundles.gen";
import { parseBundle } from "./validate";

const readJson = (path: unknown) => JSON.parse(readFileSync(path as string, "utf8"));

describe("src/bundles.gen.ts", () => {
  it("is what the generator makes from the shared bundles.json (run `npm run build:types -w extension`)", async () => {
    expect(readFileSync(TYPES_PATH as string, "utf8")).toBe(await renderBundleTypes());
  }, 30_000);

  it("takes every MIME type from the schema's x-mime-types", () => {
    const mimes = readJson(SCHEMA_PATH)["x-mime-types"];
    expect(mimes).toEqual(BUNDLE_DEF);
    expect(Object.keys(mimes)).toEqual([CHAT_MIME, TRAIN_MIME, GPU_MIME]);
  });

  it("validates a gauge's devices against protocol.json's DeviceMemory, copied in", () => {
    const defs = BUNDLE_SCHEMA.$defs as Record<string, unknown>;
    expect(defs.DeviceMemory).toEqual(readJson(PROTOCOL_PATH).$defs.DeviceMemory);
    const device = { device: "cuda:0", kind: "cuda", used: 1024, total: 4096 };
    expect(parseBundle(GPU_MIME, { version: 1, devices: [device] }).ok).toBe(true);
    // Whole bytes is a rule only protocol.json states.
    const fractional = parseBundle(GPU_MIME, { version: 1, devices: [{ ...device, used: 1.5 }] });
    expect(fractional.ok ? "" : fractional.problem.detail).toBe("/devices/0/used must be integer");
  });

  it("refuses a protocol.json reference that the protocol does not define", () => {
    const schema = { $defs: { ABundle: { properties: { d: { $ref: "protocol.json#/$defs/Nope" } } } } };
    expect(() => resolveProtocolRefs(schema, { $defs: {} })).toThrow("protocol.json#/$defs/Nope is not in protocol.json's $defs");
  });
});
