import { describe, expect, it } from "vitest";
import type { WorkerClient } from "../bridge/client";
import type { ModelInfo } from "../bridge/protocol.gen";
import { Model, type ModelHost } from "./model";

const INFO = {
  model_id: "tiny:fp32:cpu", source: "tiny", path: "/m", architecture: "Qwen2ForCausalLM", parameters: 1, dtype: "fp32",
  device: "cpu", context_length: 32, vocab_size: 10, has_chat_template: true,
} as ModelInfo;

/** A model on a fake worker that answers `unload` with `reply` and records what was sent and printed. */
function modelAnswering(reply: { unloaded: boolean; other_users?: number }, workerPid = 7) {
  const sent: unknown[] = [];
  const printed: string[] = [];
  const client = {
    info: { pid: workerPid },
    request: async (type: string, content: unknown) => {
      sent.push({ type, content });
      return { status: "ok", ...reply };
    },
  } as unknown as WorkerClient;
  const host: ModelHost = {
    connection: async () => client,
    loadOn: async () => INFO,
    sink: () => ({ text: (t) => void printed.push(t), display: () => undefined }),
  };
  return { model: new Model(host, INFO, { model: "/m" }, 7), sent, printed };
}

describe("Model.unload()", () => {
  it("resolves to nothing and prints nothing when the model is freed", async () => {
    const { model, sent, printed } = modelAnswering({ unloaded: true, other_users: 0 });
    expect(await model.unload()).toBeUndefined();
    expect(sent).toEqual([{ type: "unload", content: { model_id: "tiny:fp32:cpu" } }]);
    expect(printed).toEqual([]);
  });

  it("says when another notebook still uses the model, and how to free it anyway", async () => {
    const { model, printed } = modelAnswering({ unloaded: false, other_users: 2 });
    expect(await model.unload()).toBeUndefined();
    expect(printed).toEqual([
      "tiny:fp32:cpu is still used by 2 other notebooks; unloaded from this one (the memory is freed when the last one unloads it, or with m.unload({ force: true }))\n",
    ]);
  });

  it("sends force, and says who else lost the model", async () => {
    const { model, sent, printed } = modelAnswering({ unloaded: true, other_users: 1 });
    await model.unload({ force: true });
    expect(sent).toEqual([{ type: "unload", content: { model_id: "tiny:fp32:cpu", force: true } }]);
    expect(printed).toEqual(["tiny:fp32:cpu unloaded (force), also for the 1 other notebook using it\n"]);
  });

  it("checks its options before anything is sent, and sends nothing to a restarted worker", async () => {
    const { model, sent } = modelAnswering({ unloaded: true });
    await expect(model.unload({ force: "yes" as unknown as boolean })).rejects.toThrow(/unload option force expects true or false/);
    await expect(model.unload({ now: true } as never)).rejects.toThrow(/unload\(options\) has no option "now"; known options: force/);
    expect(sent).toEqual([]);
    const restarted = modelAnswering({ unloaded: true }, 8);
    expect(await restarted.model.unload()).toBeUndefined();
    expect(restarted.sent).toEqual([]);
  });
});
