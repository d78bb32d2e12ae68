import Ajv2020, { type ErrorObject, type ValidateFunction } from "ajv/dist/2020";
import { BUNDLE_SCHEMA, TRAIN_MIME, type BundleMimeTypes } from "./bundles.gen";
import { BUNDLE_DEF, BUNDLE_LABEL, BUNDLE_VERSION, type BundleMime } from "./mime";

/** Why a bundle cannot be shown, worded for the person looking at the notebook. */
export interface BundleProblem {
  title: string;
  detail: string;
  hint: string;
}

export type ParseResult<M extends BundleMime> =
  | { ok: true; bundle: BundleMimeTypes[M] }
  | { ok: false; problem: BundleProblem };

const MAX_LISTED_ERRORS = 4;
let validators: Map<BundleMime, ValidateFunction> | undefined;

function validatorFor(mime: BundleMime): ValidateFunction {
  if (!validators) {
    // strict: false lets the schema carry its x- annotations; allErrors lists every problem at once.
    const ajv = new Ajv2020({ allErrors: true, strict: false });
    ajv.addSchema(BUNDLE_SCHEMA);
    const id = BUNDLE_SCHEMA.$id;
    validators = new Map(
      (Object.keys(BUNDLE_DEF) as BundleMime[]).map((m) => [m, ajv.getSchema(`${id}#/$defs/${BUNDLE_DEF[m]}`)!]),
    );
  }
  return validators.get(mime)!;
}

/**
 * Checks a bundle from a notebook output against the schema. Unknown fields pass (older renderers
 * must keep working when the kernel adds some); a newer version or a wrong shape does not.
 */
export function parseBundle<M extends BundleMime>(mime: M, data: unknown): ParseResult<M> {
  const label = BUNDLE_LABEL[mime];
  if (typeof data !== "object" || data === null || Array.isArray(data)) {
    return malformed(label, `expected a JSON object, got ${describe(data)}`);
  }
  const version = (data as { version?: unknown }).version;
  if (typeof version === "number" && Number.isInteger(version) && version > BUNDLE_VERSION) {
    return {
      ok: false,
      problem: {
        title: `This ${label} was written by a newer Qwenbook`,
        detail: `It is bundle version ${version}; the installed extension reads version ${BUNDLE_VERSION}.`,
        hint: "Update the Qwenbook JupyterLab extension (in a qwenbook checkout, `npm start` reinstalls it) and reload the page.",
      },
    };
  }
  if (version === undefined) return malformed(label, `the "version" field is missing`);
  const validate = validatorFor(mime);
  if (!validate(data)) return malformed(label, formatErrors(validate.errors ?? []));
  const semantic = semanticProblem(mime, data as BundleMimeTypes[M]);
  if (semantic) return malformed(label, semantic);
  return { ok: true, bundle: data as BundleMimeTypes[M] };
}

function malformed(label: string, detail: string): { ok: false; problem: BundleProblem } {
  return {
    ok: false,
    problem: {
      title: `This ${label} output is malformed`,
      detail,
      hint: "The output was probably edited by hand or written by a different tool. Re-run the cell to draw it again.",
    },
  };
}

function formatErrors(errors: ErrorObject[]): string {
  const lines = errors.slice(0, MAX_LISTED_ERRORS).map((e) => {
    const where = e.instancePath === "" ? "the bundle" : e.instancePath;
    const allowed = (e.params as { allowedValues?: unknown[] }).allowedValues;
    const allowedConst = (e.params as { allowedValue?: unknown }).allowedValue;
    const suffix = allowed
      ? `: ${allowed.map((v) => JSON.stringify(v)).join(", ")}`
      : allowedConst !== undefined
        ? ` ${JSON.stringify(allowedConst)}`
        : "";
    return `${where} ${e.message ?? "is invalid"}${suffix}`;
  });
  const more = errors.length - lines.length;
  return lines.join("; ") + (more > 0 ? ` (and ${more} more)` : "");
}

/** Constraints JSON Schema cannot say: parallel series must line up. */
function semanticProblem(mime: BundleMime, bundle: BundleMimeTypes[BundleMime]): string | undefined {
  if (mime !== TRAIN_MIME || !("train" in bundle)) return undefined;
  const { train, eval: evals } = bundle;
  if (train.loss.length !== train.step.length) {
    return `/train/loss has ${train.loss.length} values but /train/step has ${train.step.length}`;
  }
  if (train.lr && train.lr.length > 0 && train.lr.length !== train.step.length) {
    return `/train/lr has ${train.lr.length} values but /train/step has ${train.step.length}`;
  }
  if (evals && evals.loss.length !== evals.step.length) {
    return `/eval/loss has ${evals.loss.length} values but /eval/step has ${evals.step.length}`;
  }
  return undefined;
}

function describe(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  if (typeof value === "string") return `a string (${JSON.stringify(value.slice(0, 40))}${value.length > 40 ? "…" : ""})`;
  return `a ${typeof value}`;
}
