// Where a training run's series go besides the dashboard: `.report("tensorboard")`, `.report("wandb")`,
// `.report(["tensorboard", "wandb"])` or `.report("none")`. Any training builder takes it the same way
// (the wire field is TrainOptions.report; the worker writes from the run's own progress and eval events).
import type { ReportLocations, ReportTarget } from "../bridge/protocol.gen";
import { expectOneOf } from "./validate";

/** Every target the worker writes; a Record so that a target added to protocol.json fails to compile here. */
const TARGETS: Record<ReportTarget, string> = {
  tensorboard: "event files in <output>/runs/<date>_<host>",
  wandb: "an offline wandb run in <output>/wandb (needs `pip install wandb` in the worker's Python)",
};
export const REPORT_TARGETS = Object.keys(TARGETS) as ReportTarget[];
export type ReportChoice = ReportTarget | "none";

/** The targets asked for, or undefined for "none" (the worker's default: the dashboard only). */
export function checkReport(name: string, value: unknown): readonly ReportTarget[] | undefined {
  const choices = [...REPORT_TARGETS, "none"] as const;
  const list = Array.isArray(value) ? value : [value];
  const picked = list.map((v, i) => expectOneOf(Array.isArray(value) ? `${name}[${i}]` : name, v, choices));
  if (picked.includes("none")) {
    if (picked.length > 1) throw new RangeError(`${name}: "none" turns reporting off, so it cannot go with ${JSON.stringify(picked.filter((p) => p !== "none"))}`);
    return undefined;
  }
  const targets = picked.filter((p): p is ReportTarget => p !== "none");
  const twice = targets.find((t, i) => targets.indexOf(t) !== i);
  if (twice) throw new RangeError(`${name} names "${twice}" twice`);
  if (targets.length === 0) throw new RangeError(`${name} needs a target: ${REPORT_TARGETS.map((t) => `"${t}" (${TARGETS[t]})`).join(", ")} or "none"`);
  return Object.freeze(targets);
}

/** The command that shows a run in TensorBoard: its runs/ folder, which holds each session of a resumed run. */
export function tensorboardCommand(reports: ReportLocations | undefined): string | undefined {
  const dir = reports?.tensorboard;
  if (dir === undefined) return undefined;
  const runs = dir.replace(/\/[^/]+\/?$/, "");
  return `tensorboard --logdir ${/^[\w./-]+$/.test(runs) ? runs : JSON.stringify(runs)}`;
}
