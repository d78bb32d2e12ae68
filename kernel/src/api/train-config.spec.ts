// The notebook API's training options against protocol.json's TrainOptions: every field the worker
// takes can be set from the builder, reaches the wire, shows in toString and in the dashboard, and the
// builder has no option the worker would refuse. A field added to the schema fails here until it has a
// builder method.
import { mkdirSync, mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { schemaPath } from "../../scripts/gen-protocol.mjs";
import type { TrainBeginEvent } from "../bridge/protocol.gen";
import { TRAIN_OPTIONS_DEFAULTS, TRAIN_OPTIONS_FIELDS } from "../bridge/protocol.gen";
import { TrainRun } from "./train";
import { dashboardConfig, optionName, settingRows, toTrainOptions, TRAIN_OPTIONS, type TrainOptionField } from "./train-config";

interface Property {
  type?: string;
  enum?: unknown[];
  default?: unknown;
  minimum?: number;
  exclusiveMaximum?: number;
  items?: { $ref?: string };
}
const schema = JSON.parse(readFileSync(schemaPath, "utf8")) as { $defs: Record<string, { properties: Record<string, Property>; enum?: unknown[] }> };
const properties = schema.$defs.TrainOptions.properties;

/**
 * Worker options the notebook API does not offer yet. Each wants a checked builder method in train.ts
 * (with its hint); then it leaves this list, which the last test keeps exact.
 */
const NOT_YET_IN_BUILDER: string[] = [];

/** Builder methods that set something other than one TrainOptions field. */
const NOT_OPTIONS = ["constructor", "dataset", "preview", "train", "toString", "quiet", "devices", "strategy", "cluster", "settings", "result"];

const dir = mkdtempSync(join(tmpdir(), "qwenbook-train-config-spec-"));
const checkpoint = join(dir, "run", "checkpoint-4");
mkdirSync(checkpoint, { recursive: true });

/** A value the schema allows that differs from the default where it can, so setting it shows. */
function sample(field: string, p: Property): unknown {
  if (field === "output_dir") return join(dir, "out");
  if (field === "resume_from") return checkpoint;
  if (p.enum) return p.enum[p.enum.length - 1];
  // A list of an enum (report): every value it allows.
  const items = p.items?.$ref?.replace("#/$defs/", "");
  if (p.type === "array" && items) return schema.$defs[items]!.enum;
  switch (p.type) {
    case "boolean":
      return true;
    case "integer":
      return (p.minimum ?? 0) + 3;
    case "number":
      return 0.25;
    case "array":
      return [0.5, 0.5];
    default:
      throw new Error(`no sample for TrainOptions.${field} (${JSON.stringify(p)}): teach sample() its type`);
  }
}

const target = { model: { id: "tiny-qwen2" }, sink: () => undefined, connect: async () => undefined, gauge: () => undefined };
const base = () => TrainRun.lora(target as unknown as Parameters<typeof TrainRun.lora>[0]);
/** The fields a run is made with (m.lora(options), m.fullFinetune(), m.preference(options), an adapter view's builders). */
const STRUCTURAL = ["method", "lora", "preference", "init_adapter"];
/** The schema's fields but those. */
const optionFields = Object.keys(properties).filter((f): f is TrainOptionField => !STRUCTURAL.includes(f));
const settable = optionFields.filter((f) => !NOT_YET_IN_BUILDER.includes(f));

type Setter = (value: unknown) => TrainRun;
const setter = (run: TrainRun, name: string): Setter | undefined => {
  const method = (run as unknown as Record<string, unknown>)[name];
  return typeof method === "function" ? (method as Setter).bind(run) : undefined;
};

describe("training options and protocol.json's TrainOptions", () => {
  it("are the schema's fields, in its order, with its defaults", () => {
    expect(TRAIN_OPTIONS_FIELDS).toEqual(Object.keys(properties));
    const defaults = Object.fromEntries(Object.entries(properties).filter(([, p]) => "default" in p).map(([f, p]) => [f, p.default]));
    expect(TRAIN_OPTIONS_DEFAULTS).toEqual(defaults);
    expect(TRAIN_OPTIONS.map(([field]) => field)).toEqual(TRAIN_OPTIONS_FIELDS.filter((f) => !STRUCTURAL.includes(f)));
  });

  it("names each option in camelCase, the folders as output and resume", () => {
    expect(optionName("max_grad_norm")).toBe("maxGradNorm");
    expect(optionName("gradient_checkpointing")).toBe("gradientCheckpointing");
    expect(optionName("lr")).toBe("lr");
    expect(optionName("output_dir")).toBe("output");
    expect(optionName("resume_from")).toBe("resume");
  });

  it.each(settable)("%s is set by a builder method and sent as the worker names it", (field) => {
    const name = optionName(field);
    const value = sample(field, properties[field]);
    const set = setter(base(), name);
    expect(set, `TrainRun has no ${name}() for TrainOptions.${field}`).toBeTypeOf("function");
    const run = set!(value);
    const wire = toTrainOptions(run.settings, run.settings.output ?? join(dir, "default"));
    expect(wire[field]).toEqual(value);
    // toString's row for it, and nothing sent that was not set (the worker keeps its defaults).
    expect(settingRows(run.settings, dir).map(([k]) => k)).toContain(name);
    const sent = Object.keys(wire).filter((k) => k !== "output_dir" && !STRUCTURAL.includes(k));
    expect(sent).toEqual(field === "output_dir" ? [] : [field]);
  });

  it("sets method and lora by how the run is made", () => {
    const lora = TrainRun.lora(target as unknown as Parameters<typeof TrainRun.lora>[0], { r: 4 });
    expect(toTrainOptions(lora.settings, "/o")).toEqual({ output_dir: "/o", method: "lora", lora: { r: 4 } });
    const full = TrainRun.full(target as unknown as Parameters<typeof TrainRun.full>[0]);
    expect(toTrainOptions(full.settings, "/o")).toEqual({ output_dir: "/o", method: "full" });
    const t = target as unknown as Parameters<typeof TrainRun.preference>[0];
    expect(toTrainOptions(TrainRun.preference(t, { method: "orpo", beta: 0.2 }).settings, "/o")).toEqual({
      output_dir: "/o", method: "lora", preference: { method: "orpo", beta: 0.2 },
    });
    expect(toTrainOptions(TrainRun.preference(t, {}, "/sft").settings, "/o")).toEqual({
      output_dir: "/o", method: "lora", preference: { method: "dpo" }, init_adapter: "/sft",
    });
  });

  it("has no builder option the worker does not take", () => {
    const methods = Object.getOwnPropertyNames(TrainRun.prototype).filter((m) => !NOT_OPTIONS.includes(m));
    const named = new Set(TRAIN_OPTIONS.map(([, name]) => name as string));
    expect(methods.filter((m) => !named.has(m))).toEqual([]);
  });

  it("shows every option the worker reports in the dashboard's config table, under the builder's name", () => {
    const config = Object.fromEntries(
      Object.entries(properties)
        .filter(([f]) => f !== "preference" && f !== "init_adapter")
        .map(([f, p]) => [f, f === "lora" ? { r: 8 } : "default" in p ? p.default : sample(f, p)]),
    );
    const begin = { examples: 1, trainable_params: 1, device: "cpu", config } as unknown as TrainBeginEvent;
    const shown = Object.keys(dashboardConfig(begin, join(dir, "out"), dir));
    // The folders show as output (always) and resumedFrom (when the run resumed), not as options.
    const expected = TRAIN_OPTIONS.filter(([f]) => f !== "output_dir" && f !== "resume_from").map(([, name]) => name);
    for (const name of expected) expect(shown).toContain(name);
  });

  it("lists exactly the worker options still missing a builder method", () => {
    const missing = optionFields.filter((f) => setter(base(), optionName(f)) === undefined);
    expect(missing).toEqual(NOT_YET_IN_BUILDER);
  });
});
